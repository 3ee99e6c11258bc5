/* sigclash: a program that wants SIGUSR2, the signal migrate uses for checkpoints by default.
 * It installs its own handler for SIGUSR2 and blocks SIGUSR2; migrate must keep checkpointing
 * on SIGUSR2 while showing the program its own view of the signal.
 *
 * usage: sigclash
 *
 * Output (stdout, line buffered):
 *   ready pid=<getpid>
 *   own-handler            (from the program's SIGUSR2 handler, if it ever runs)
 * then one command per stdin line:
 *   query  -> handler=<ok|bad> blocked=<0|1>
 *             handler=ok if sigaction(SIGUSR2, NULL, &old) returns the program's own handler;
 *             blocked=1 if sigprocmask(SIG_BLOCK, NULL, &old) shows SIGUSR2 blocked
 *   tick   -> tick <n>  (n = 1, 2, ...)
 *   quit   -> bye, exit 0
 *   other  -> unknown <command>
 * EOF on stdin -> stdin-eof, exit 1.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void on_usr2(int sig)
{
    (void)sig;
    static const char msg[] = "own-handler\n";
    if (write(1, msg, sizeof msg - 1) < 0)
        _exit(3);
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr2;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR2, &sa, NULL) != 0) {
        perror("sigclash: sigaction");
        return 1;
    }
    sigset_t usr2;
    sigemptyset(&usr2);
    sigaddset(&usr2, SIGUSR2);
    if (sigprocmask(SIG_BLOCK, &usr2, NULL) != 0) {
        perror("sigclash: sigprocmask");
        return 1;
    }

    printf("ready pid=%d\n", (int)getpid());

    unsigned long ticks = 0;
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\r\n")] = '\0';
        if (strcmp(line, "query") == 0) {
            struct sigaction old;
            memset(&old, 0, sizeof old);
            int ok = sigaction(SIGUSR2, NULL, &old) == 0 && old.sa_handler == on_usr2;
            sigset_t mask;
            sigemptyset(&mask);
            int blocked = sigprocmask(SIG_BLOCK, NULL, &mask) == 0 && sigismember(&mask, SIGUSR2) == 1;
            printf("handler=%s blocked=%d\n", ok ? "ok" : "bad", blocked);
        } else if (strcmp(line, "tick") == 0) {
            printf("tick %lu\n", ++ticks);
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
