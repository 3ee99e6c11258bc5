/* signals: a blocked, pending SIGUSR1 with an SA_SIGINFO handler, driven from stdin.
 *
 * usage: signals
 *
 * Output (stdout, line buffered):
 *   ready pid=<getpid>
 *   pending=<1 if SIGUSR1 is pending, else 0>
 * then one command per stdin line:
 *   show     -> disp=<ok|bad> mask=<1 if SIGUSR1 blocked> pending=<1 if SIGUSR1 pending>
 *   unblock  -> handler sig=<signo> code=<si_code>   (from the handler, once per delivery)
 *               unblocked
 *   quit     -> bye, exit 0
 *   other    -> unknown <command>
 * EOF on stdin -> stdin-eof, exit 1.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void on_usr1(int sig, siginfo_t *info, void *uctx)
{
    (void)uctx;
    char buf[96];
    int len = snprintf(buf, sizeof buf, "handler sig=%d code=%d\n", sig, info ? info->si_code : -1);
    if (len > 0 && write(1, buf, (size_t)len) < 0)
        _exit(3);
}

static int usr1_pending(void)
{
    sigset_t p;
    sigemptyset(&p);
    sigpending(&p);
    return sigismember(&p, SIGUSR1) == 1;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_usr1;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR1, &sa, NULL) != 0) {
        perror("signals: sigaction");
        return 1;
    }
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    if (sigprocmask(SIG_BLOCK, &usr1, NULL) != 0) {
        perror("signals: sigprocmask");
        return 1;
    }
    kill(getpid(), SIGUSR1);

    printf("ready pid=%d\n", (int)getpid());
    printf("pending=%d\n", usr1_pending());

    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\r\n")] = '\0';
        if (strcmp(line, "show") == 0) {
            struct sigaction cur;
            memset(&cur, 0, sizeof cur);
            sigaction(SIGUSR1, NULL, &cur);
            int ok = (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_usr1;
            sigset_t mask;
            sigemptyset(&mask);
            sigprocmask(SIG_BLOCK, NULL, &mask);
            printf("disp=%s mask=%d pending=%d\n", ok ? "ok" : "bad", sigismember(&mask, SIGUSR1) == 1,
                   usr1_pending());
        } else if (strcmp(line, "unblock") == 0) {
            sigprocmask(SIG_UNBLOCK, &usr1, NULL);
            printf("unblocked\n");
        } else if (strcmp(line, "quit") == 0) {
            printf("bye\n");
            return 0;
        } else {
            printf("unknown %s\n", line);
        }
    }
    printf("stdin-eof\n");
    return 1;
}
