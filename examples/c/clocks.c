/* Prints the clocks every 100 ms: "tick N mono=MS boot=MS real=MS". A resumed copy must not see
 * CLOCK_MONOTONIC or CLOCK_BOOTTIME jump (by the host difference or the stopped time). */
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static long long ms(clockid_t c) {
    struct timespec t;
    clock_gettime(c, &t);
    return t.tv_sec * 1000LL + t.tv_nsec / 1000000;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready pid=%d\n", (int)getpid());
    for (int i = 1;; i++) {
        printf("tick %d mono=%lld boot=%lld real=%lld\n", i, ms(CLOCK_MONOTONIC), ms(CLOCK_BOOTTIME),
               ms(CLOCK_REALTIME));
        usleep(100000);
    }
}
