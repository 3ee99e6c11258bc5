/* exiter: exits with a status chosen on stdin, to check that migrate-run and migrate-resume
 * pass the program's exit status (and stdin) through.
 *
 * usage: exiter
 *
 * Output (stdout, line buffered):
 *   ready pid=<getpid>
 * then it reads one line from stdin:
 *   <n>         -> exiting <n>, exit(n)
 *   signal <n>  -> raising <n>; the signal's disposition is reset to SIG_DFL and it is
 *                  unblocked first, so the default action (termination) happens
 *   other       -> unknown <line>, exit 2
 * EOF on stdin -> stdin-eof, exit 1.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready pid=%d\n", (int)getpid());

    char line[256];
    if (!fgets(line, sizeof line, stdin)) {
        printf("stdin-eof\n");
        return 1;
    }
    line[strcspn(line, "\r\n")] = '\0';

    char *end;
    if (strncmp(line, "signal ", 7) == 0) {
        long sig = strtol(line + 7, &end, 10);
        if (*end != '\0' || sig < 1 || sig > 64) {
            printf("unknown %s\n", line);
            return 2;
        }
        printf("raising %ld\n", sig);
        signal((int)sig, SIG_DFL);
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, (int)sig);
        sigprocmask(SIG_UNBLOCK, &set, NULL);
        raise((int)sig);
        printf("survived %ld\n", sig);
        return 3;
    }
    long code = strtol(line, &end, 10);
    if (line[0] == '\0' || *end != '\0' || code < 0 || code > 255) {
        printf("unknown %s\n", line);
        return 2;
    }
    printf("exiting %ld\n", code);
    exit((int)code);
}
