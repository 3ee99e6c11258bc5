/* lazymem: memory a lazy restore must bring back exactly, and the calls that change a lazily
 * restored address space under it.
 *
 * usage: lazymem <MiB> <file>
 *
 * Memory: A (<MiB> MiB), B, C, D (4 MiB each) and E (1 MiB) are private anonymous mappings
 * filled with pseudo-random words; four worker threads each checksum a quarter of A on request.
 * <file> is read into the start of E by the "ops" command.
 *
 * Commands (one per line on stdin), each answered by one line on stdout; n counts commands:
 *   sum      sum n=<n> a=<hex>
 *   threads  threads n=<n> q0=<hex> q1=<hex> q2=<hex> q3=<hex>   (computed by the 4 workers at once)
 *   ops      ops n=<n> zero=<0|1> b2=<hex> c=<hex> d1=<hex> ehead=<hex> file=<hex> etail=<hex> fork=<hex>
 *              madvise(MADV_DONTNEED) on B's first half (zero=1 if it reads zeros), the rest of B
 *              (b2); mremap of C elsewhere (c, read at its new address); munmap of D's second
 *              half (d1: the first half); read(2) of <file> into E's first 64 KiB (ehead, and
 *              file: the same bytes read into fresh memory), the rest of E (etail); fork(),
 *              whose child checksums A (fork).
 * At start: ready pid=<pid> a=<hex> b2=<hex> c=<hex> d1=<hex> etail=<hex> q0=.. q3=<hex>
 * Checksums: FNV-1a over one 64-bit word per 64 bytes (every page is touched).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define MIB (1024UL * 1024UL)
#define HEAD (64UL * 1024UL)

static uint64_t *A, *B, *C, *D, *E, *R;
static size_t a_len;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int round_no, done_count;
static uint64_t quarter[4];

static uint64_t sum(const void *p, size_t len)
{
    const uint64_t *w = p;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < len / 8; i += 8) {
        h ^= w[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static void *map(size_t len, uint64_t seed)
{
    uint64_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    for (size_t i = 0; i < len / 8; i++) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        p[i] = seed;
    }
    return p;
}

static void *worker(void *arg)
{
    int q = (int)(intptr_t)arg;
    int seen = 0;
    for (;;) {
        pthread_mutex_lock(&mu);
        while (round_no == seen)
            pthread_cond_wait(&cv, &mu);
        seen = round_no;
        pthread_mutex_unlock(&mu);
        uint64_t h = sum((char *)A + q * (a_len / 4), a_len / 4);
        pthread_mutex_lock(&mu);
        quarter[q] = h;
        done_count++;
        pthread_cond_broadcast(&cv);
        pthread_mutex_unlock(&mu);
    }
    return NULL;
}

static void run_threads(void)
{
    pthread_mutex_lock(&mu);
    done_count = 0;
    round_no++;
    pthread_cond_broadcast(&cv);
    while (done_count < 4)
        pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: lazymem <MiB> <file>\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    a_len = strtoul(argv[1], NULL, 10) * MIB;
    const char *file = argv[2];
    A = map(a_len, 0x9e3779b97f4a7c15ULL);
    B = map(4 * MIB, 2);
    C = map(4 * MIB, 3);
    D = map(4 * MIB, 4);
    E = map(1 * MIB, 5);
    /* Where C moves to. */
    R = mmap(NULL, 4 * MIB, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    pthread_t t;
    for (int q = 0; q < 4; q++)
        pthread_create(&t, NULL, worker, (void *)(intptr_t)q);
    run_threads();
    printf("ready pid=%d a=%016llx b2=%016llx c=%016llx d1=%016llx etail=%016llx q0=%016llx q1=%016llx q2=%016llx "
           "q3=%016llx\n",
           getpid(), (unsigned long long)sum(A, a_len), (unsigned long long)sum((char *)B + 2 * MIB, 2 * MIB),
           (unsigned long long)sum(C, 4 * MIB), (unsigned long long)sum(D, 2 * MIB),
           (unsigned long long)sum((char *)E + HEAD, MIB - HEAD), (unsigned long long)quarter[0],
           (unsigned long long)quarter[1], (unsigned long long)quarter[2], (unsigned long long)quarter[3]);

    char line[64];
    int n = 0;
    while (fgets(line, sizeof line, stdin)) {
        n++;
        if (strncmp(line, "sum", 3) == 0) {
            printf("sum n=%d a=%016llx\n", n, (unsigned long long)sum(A, a_len));
        } else if (strncmp(line, "threads", 7) == 0) {
            run_threads();
            printf("threads n=%d q0=%016llx q1=%016llx q2=%016llx q3=%016llx\n", n, (unsigned long long)quarter[0],
                   (unsigned long long)quarter[1], (unsigned long long)quarter[2], (unsigned long long)quarter[3]);
        } else if (strncmp(line, "ops", 3) == 0) {
            madvise(B, 2 * MIB, MADV_DONTNEED);
            int zero = 1;
            for (size_t i = 0; i < 2 * MIB / 8; i++)
                if (B[i] != 0)
                    zero = 0;
            uint64_t b2 = sum((char *)B + 2 * MIB, 2 * MIB);
            uint64_t *moved = mremap(C, 4 * MIB, 4 * MIB, MREMAP_MAYMOVE | MREMAP_FIXED, R);
            uint64_t c = moved == MAP_FAILED ? 0 : sum(moved, 4 * MIB);
            munmap((char *)D + 2 * MIB, 2 * MIB);
            uint64_t d1 = sum(D, 2 * MIB);
            int fd = open(file, O_RDONLY);
            ssize_t got = read(fd, E, HEAD);
            char *fresh = calloc(1, HEAD);
            ssize_t got2 = pread(fd, fresh, HEAD, 0);
            close(fd);
            uint64_t ehead = got == (ssize_t)HEAD ? sum(E, HEAD) : 0;
            uint64_t fh = got2 == (ssize_t)HEAD ? sum(fresh, HEAD) : 1;
            free(fresh);
            uint64_t etail = sum((char *)E + HEAD, MIB - HEAD);
            int pfd[2];
            uint64_t forked = 0;
            if (pipe(pfd) == 0) {
                pid_t child = fork();
                if (child == 0) {
                    uint64_t h = sum(A, a_len);
                    ssize_t w = write(pfd[1], &h, sizeof h);
                    _exit(w == sizeof h ? 0 : 1);
                }
                close(pfd[1]);
                if (read(pfd[0], &forked, sizeof forked) != sizeof forked)
                    forked = 0;
                close(pfd[0]);
                waitpid(child, NULL, 0);
            }
            printf("ops n=%d zero=%d b2=%016llx c=%016llx d1=%016llx ehead=%016llx file=%016llx etail=%016llx "
                   "fork=%016llx\n",
                   n, zero, (unsigned long long)b2, (unsigned long long)c, (unsigned long long)d1,
                   (unsigned long long)ehead, (unsigned long long)fh, (unsigned long long)etail,
                   (unsigned long long)forked);
        } else {
            printf("unknown n=%d\n", n);
        }
    }
    return 0;
}
