/* workload: the benchmark program of BENCHMARKS.md.
 *
 * usage: workload <MiB> <output file> [random|mixed]
 *
 * mallocs <MiB> MiB and fills every byte of it with pseudo-random data (xorshift64), so that the
 * memory is resident and incompressible (`random`, the default); `mixed` (migrate-bench
 * --memory mixed, for compressed images) fills each 64 KiB block in turn with random bytes,
 * zeros, or text-like words (two blocks in four), closer to a real program's heap;
 * prints "ready" on stdout (line-buffered) once filled;
 * then loops forever, appending "<counter>\n" to the output file every 100 ms, counter starting at
 * 1. The file is opened once (O_WRONLY|O_APPEND|O_CREAT) and each line is one write(2), unbuffered,
 * so a reader never sees a line in two pieces.
 *
 * The period is kept against absolute CLOCK_MONOTONIC deadlines, and a missed deadline is not made
 * up with a burst: when the next deadline has already passed, it moves to now + 100 ms. After a checkpoint and a
 * restore the pending deadline has passed, so the restored program writes its next line as soon
 * as it runs again, whatever the checkpointer does with an interrupted sleep (restarting it in
 * full, resuming the remainder, or failing it with EINTR as CRIU does). The time from the restore
 * command to that line is therefore the restore time, not restore time plus part of a period.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PERIOD_NS 100000000LL

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_until(long long deadline_ns)
{
    struct timespec ts = {.tv_sec = deadline_ns / 1000000000LL, .tv_nsec = deadline_ns % 1000000000LL};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

int main(int argc, char **argv)
{
    if (argc != 3 && argc != 4) {
        fprintf(stderr, "usage: %s <MiB> <output file> [random|mixed]\n", argv[0]);
        return 2;
    }
    int mixed = argc == 4 && strcmp(argv[3], "mixed") == 0;
    char *end;
    errno = 0;
    unsigned long long mib = strtoull(argv[1], &end, 10);
    if (errno || *end || end == argv[1] || mib > (1ULL << 20)) {
        fprintf(stderr, "workload: bad size %s (MiB)\n", argv[1]);
        return 2;
    }
    size_t bytes = (size_t)mib << 20;
    size_t nwords = bytes / sizeof(uint64_t);
    uint64_t *buf = malloc(bytes ? bytes : 1);
    if (!buf) {
        fprintf(stderr, "workload: cannot allocate %llu MiB\n", mib);
        return 1;
    }
    uint64_t s = 0x9e3779b97f4a7c15ULL ^ (uint64_t)now_ns();
    for (size_t i = 0; i < nwords; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        buf[i] = s;
    }
    /* mixed: of every four 64 KiB blocks, one stays random, one is zeros, two are words. */
    static const char *words[] = {"checkpoint ", "restore ", "memory ", "page ", "frame ", "the ", "of ", "\n"};
    char *bytes_at = (char *)buf;
    for (size_t block = 0; mixed && (block << 16) < bytes; block++) {
        size_t start = block << 16, end = start + (1 << 16) < bytes ? start + (1 << 16) : bytes;
        if (block % 4 == 1) {
            memset(bytes_at + start, 0, end - start);
        } else if (block % 4 >= 2) {
            for (size_t at = start; at < end;) {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                const char *w = words[s % 8];
                size_t n = strlen(w) < end - at ? strlen(w) : end - at;
                memcpy(bytes_at + at, w, n);
                at += n;
            }
        }
    }
    /* The buffer is never read: tell the compiler its contents matter, so the fill is kept. */
    __asm__ volatile("" : : "r"(buf) : "memory");

    int fd = open(argv[2], O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        fprintf(stderr, "workload: open %s: %s\n", argv[2], strerror(errno));
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");

    long long deadline = now_ns();
    for (unsigned long long counter = 1;; counter++) {
        char line[32];
        int n = snprintf(line, sizeof line, "%llu\n", counter);
        if (write(fd, line, (size_t)n) != n) {
            fprintf(stderr, "workload: write %s: %s\n", argv[2], strerror(errno));
            return 1;
        }
        long long now = now_ns();
        deadline += PERIOD_NS;
        if (deadline < now)
            deadline = now + PERIOD_NS;
        sleep_until(deadline);
    }
}
