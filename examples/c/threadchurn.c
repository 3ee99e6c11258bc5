/* threadchurn: threads created and joined in a tight loop, so that checkpoints land while
 * threads are being created, running and exiting.
 *
 * usage: threadchurn
 *
 * Each round creates 8 threads; thread k of round r returns r * 1000003 + k * 7 + 1 and
 * records its gettid(). main joins them and checks every return value and their sum, and that
 * the 8 tids were distinct and different from main's own tid.
 *
 * Output (stdout, line buffered):
 *   ready pid=<getpid>
 *   round <r> ok=1 pid=<getpid>          every 100 rounds (then a 20 ms pause)
 *   BAD round=<r> <what>                 on any mismatch, then exit 1
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NTHREADS 8

struct arg {
    uint64_t round;
    uint64_t k;
    pid_t tid;
};

static uint64_t expect(uint64_t round, uint64_t k)
{
    return round * 1000003u + k * 7u + 1u;
}

static void *run(void *p)
{
    struct arg *a = p;
    a->tid = gettid();
    return (void *)(uintptr_t)expect(a->round, a->k);
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready pid=%d\n", (int)getpid());
    for (uint64_t r = 1;; r++) {
        pthread_t th[NTHREADS];
        struct arg args[NTHREADS];
        uint64_t want = 0, got = 0;
        for (uint64_t k = 0; k < NTHREADS; k++) {
            args[k] = (struct arg){.round = r, .k = k, .tid = 0};
            want += expect(r, k);
            int rc = pthread_create(&th[k], NULL, run, &args[k]);
            if (rc != 0) {
                printf("BAD round=%llu pthread_create rc=%d (%s)\n", (unsigned long long)r, rc, strerror(rc));
                return 1;
            }
        }
        for (uint64_t k = 0; k < NTHREADS; k++) {
            void *ret = NULL;
            int rc = pthread_join(th[k], &ret);
            if (rc != 0) {
                printf("BAD round=%llu pthread_join rc=%d (%s)\n", (unsigned long long)r, rc, strerror(rc));
                return 1;
            }
            if ((uint64_t)(uintptr_t)ret != expect(r, k)) {
                printf("BAD round=%llu thread %llu returned %llu, expected %llu\n", (unsigned long long)r,
                       (unsigned long long)k, (unsigned long long)(uintptr_t)ret,
                       (unsigned long long)expect(r, k));
                return 1;
            }
            got += (uint64_t)(uintptr_t)ret;
        }
        if (got != want) {
            printf("BAD round=%llu sum=%llu expected=%llu\n", (unsigned long long)r, (unsigned long long)got,
                   (unsigned long long)want);
            return 1;
        }
        pid_t me = gettid();
        for (int i = 0; i < NTHREADS; i++) {
            for (int j = 0; j < NTHREADS; j++) {
                if (args[i].tid <= 0 || args[i].tid == me || (i != j && args[i].tid == args[j].tid)) {
                    printf("BAD round=%llu tids: thread %d has %d, thread %d has %d, main %d\n", (unsigned long long)r,
                           i, (int)args[i].tid, j, (int)args[j].tid, (int)me);
                    return 1;
                }
            }
        }
        if (r % 100 == 0) {
            printf("round %llu ok=1 pid=%d\n", (unsigned long long)r, (int)getpid());
            struct timespec ts = {.tv_sec = 0, .tv_nsec = 20 * 1000000L};
            nanosleep(&ts, NULL);
        }
    }
}
