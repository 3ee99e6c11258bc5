/* mainexit: the main thread leaves with pthread_exit while two threads carry on.
 *
 * usage: mainexit
 *
 * main prints `ready`, starts two threads and calls pthread_exit(NULL): the process lives on
 * with a dead (zombie) thread-group leader. The ticker prints a tick every 100 ms; the napper
 * sleeps in 30 ms nanosleep calls, counting them.
 *
 * Output (stdout, line buffered):
 *   ready pid=<getpid>
 *   tick <n> pid=<getpid> naps=<naps completed so far> tid=<gettid of the ticker>
 *   BAD <what>      (nanosleep failed with something other than EINTR), then exit 1
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static atomic_uint_fast64_t naps;

static void *napper(void *arg)
{
    (void)arg;
    for (;;) {
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 30 * 1000000L};
        while (nanosleep(&ts, &ts) != 0) {
            if (errno != EINTR) {
                printf("BAD nanosleep errno=%d\n", errno);
                exit(1);
            }
        }
        atomic_fetch_add(&naps, 1);
    }
    return NULL;
}

static void *ticker(void *arg)
{
    (void)arg;
    for (uint64_t n = 1;; n++) {
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 100 * 1000000L};
        while (nanosleep(&ts, &ts) != 0) {
            if (errno != EINTR) {
                printf("BAD nanosleep errno=%d\n", errno);
                exit(1);
            }
        }
        printf("tick %llu pid=%d naps=%llu tid=%d\n", (unsigned long long)n, (int)getpid(),
               (unsigned long long)atomic_load(&naps), (int)gettid());
    }
    return NULL;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready pid=%d\n", (int)getpid());
    pthread_t a, b;
    if (pthread_create(&a, NULL, ticker, NULL) != 0 || pthread_create(&b, NULL, napper, NULL) != 0) {
        fprintf(stderr, "mainexit: pthread_create failed\n");
        return 1;
    }
    pthread_exit(NULL);
}
