/* counter: a single-threaded program whose whole state can be checked after a resume.
 *
 * usage: counter <MiB of heap buffer> <tick ms> <log file>
 *
 * Output (stdout, line buffered, one line per event):
 *   ready pid=<getpid> ppid=<getppid> seed=<16 hex digits>
 *   tick <n> pid=<getpid> heap=<16 hex> list=<decimal> data=<16 hex> off=<decimal>
 *
 * heap= checksum of the malloc'd buffer (one 64-bit word per 64 bytes), recomputed every tick;
 *       constant for the life of the process.
 * list= sum of a malloc'd 1000-node linked list, recomputed every tick; constant.
 * data= checksum of an initialized (.data) and a zeroed (.bss) array, both updated every tick;
 *       a function of n only (see data_checksum in tests/src/lib.rs, which mirrors it).
 * off=  lseek(fd1, 0, SEEK_CUR) after the tick's log writes: the sum over k <= n of
 *       strlen("A k\n") + strlen("B k\n").
 *
 * The log file is opened O_WRONLY|O_CREAT|O_TRUNC and dup()ed: "A n\n" is written through the
 * first descriptor and "B n\n" through the second, so the file reads A 1, B 1, A 2, B 2, ...
 * only if both descriptors keep sharing one offset.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NDATA 16
#define NLIST 1000

/* .data: initialized, non-zero. */
static uint64_t data_arr[NDATA] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
/* .bss: zero until main fills it. */
static uint64_t bss_arr[NDATA];

struct node {
    struct node *next;
    uint64_t value;
};

static uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

static uint64_t heap_checksum(const uint64_t *words, size_t nwords)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < nwords; i += 8) {
        h ^= words[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static uint64_t data_checksum(void)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (int i = 0; i < NDATA; i++) {
        h ^= data_arr[i];
        h *= 0x100000001b3ULL;
    }
    for (int i = 0; i < NDATA; i++) {
        h ^= bss_arr[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static void write_line(int fd, char tag, unsigned long long n)
{
    char buf[64];
    int len = snprintf(buf, sizeof buf, "%c %llu\n", tag, n);
    ssize_t w = write(fd, buf, (size_t)len);
    if (w != len) {
        fprintf(stderr, "counter: write to log fd %d: %s\n", fd, w < 0 ? strerror(errno) : "short write");
        exit(1);
    }
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 4) {
        fprintf(stderr, "usage: %s <MiB of heap buffer> <tick ms> <log file>\n", argv[0]);
        return 2;
    }
    size_t mib = strtoul(argv[1], NULL, 10);
    unsigned long tick_ms = strtoul(argv[2], NULL, 10);
    const char *log_path = argv[3];

    uint64_t seed = 0x9E3779B97F4A7C15ULL ^ (uint64_t)getpid();
    uint64_t state = seed;

    size_t nwords = mib * (1024 * 1024 / 8);
    if (nwords == 0)
        nwords = 8;
    uint64_t *buf = malloc(nwords * sizeof *buf);
    if (!buf) {
        perror("counter: malloc");
        return 1;
    }
    for (size_t i = 0; i < nwords; i++)
        buf[i] = xorshift64(&state);

    struct node *head = NULL;
    for (int i = 0; i < NLIST; i++) {
        struct node *nd = malloc(sizeof *nd);
        if (!nd) {
            perror("counter: malloc");
            return 1;
        }
        nd->value = xorshift64(&state) % 1000003;
        nd->next = head;
        head = nd;
    }

    for (int i = 0; i < NDATA; i++)
        bss_arr[i] = (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ULL;

    int fd1 = open(log_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd1 < 0) {
        fprintf(stderr, "counter: open %s: %s\n", log_path, strerror(errno));
        return 1;
    }
    int fd2 = dup(fd1);
    if (fd2 < 0) {
        perror("counter: dup");
        return 1;
    }

    printf("ready pid=%d ppid=%d seed=%016llx\n", (int)getpid(), (int)getppid(), (unsigned long long)seed);

    for (unsigned long long n = 1;; n++) {
        write_line(fd1, 'A', n);
        write_line(fd2, 'B', n);

        bss_arr[n % NDATA] += n;
        data_arr[(n * 7) % NDATA] ^= n * 0x100000001b3ULL;

        uint64_t list_sum = 0;
        for (struct node *nd = head; nd; nd = nd->next)
            list_sum += nd->value;
        off_t off = lseek(fd1, 0, SEEK_CUR);

        printf("tick %llu pid=%d heap=%016llx list=%llu data=%016llx off=%lld\n", n, (int)getpid(),
               (unsigned long long)heap_checksum(buf, nwords), (unsigned long long)list_sum,
               (unsigned long long)data_checksum(), (long long)off);
        usleep(tick_ms * 1000);
    }
}
