/* sleeper: one long sleep, to check that a checkpoint neither cuts it short nor restarts it.
 *
 * usage: sleeper <seconds> [sleep|nanosleep]
 *
 * Output (stdout, line buffered):
 *   ready pid=<getpid>
 *   sleeping <seconds> at <CLOCK_REALTIME ms> mode=<sleep|nanosleep>
 *   slept rc=<return value> at <CLOCK_REALTIME ms> errno=<errno after the call>
 *         [eintr=<1 if nanosleep returned -1 with EINTR> rem=<rem in ms>]   (nanosleep mode)
 * then exit 0.
 *
 * sleep mode:     rc is sleep()'s return value (0 = slept the whole time).
 * nanosleep mode: one nanosleep(&req, &rem) call; rc is its return value (0 or -1).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s <seconds> [sleep|nanosleep]\n", argv[0]);
        return 2;
    }
    unsigned secs = (unsigned)strtoul(argv[1], NULL, 10);
    int nano = argc == 3 && strcmp(argv[2], "nanosleep") == 0;
    if (argc == 3 && !nano && strcmp(argv[2], "sleep") != 0) {
        fprintf(stderr, "sleeper: unknown mode %s\n", argv[2]);
        return 2;
    }
    printf("ready pid=%d\n", (int)getpid());
    printf("sleeping %u at %lld mode=%s\n", secs, now_ms(), nano ? "nanosleep" : "sleep");
    if (nano) {
        struct timespec req = {.tv_sec = secs, .tv_nsec = 0}, rem = {0, 0};
        errno = 0;
        int rc = nanosleep(&req, &rem);
        int e = errno;
        long long t = now_ms();
        printf("slept rc=%d at %lld errno=%d eintr=%d rem=%lld\n", rc, t, e, rc == -1 && e == EINTR,
               (long long)rem.tv_sec * 1000 + rem.tv_nsec / 1000000);
    } else {
        errno = 0;
        unsigned rc = sleep(secs);
        int e = errno;
        long long t = now_ms();
        printf("slept rc=%u at %lld errno=%d\n", rc, t, e);
    }
    return 0;
}
