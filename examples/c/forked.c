/* forked: a program whose every change of state is driven by its standard input, so that a
 * test knows exactly which state a checkpoint saw (tests/tests/forked.rs).
 *
 * usage: forked <MiB of heap> <children: 0 or 1> <directory for its deleted file>
 *
 * State: a heap buffer (random bytes), a MAP_SHARED anonymous region made before the fork
 * (shared with the child), a MAP_SHARED anonymous region of the parent's own, a file created
 * in the directory, unlinked and kept open (deleted), and with a child: a pipe to it that
 * always holds one record the child has not read yet, and a doorbell pipe.
 *
 * Output (stdout, line buffered):
 *   ready pid=<getpid> children=<n>
 *   tick <n> pid=<getpid> heap=<hex> shared=<hex> own=<hex> file=<hex> wait=<waitpid(-1, WNOHANG)>
 *   child <k> pid=<getpid> ppid=<getppid> heap=<hex> shared=<hex> rec=<ok|bad>
 *
 * Each line on stdin makes one tick n = 1, 2, ...: one word of every page of the heap and of
 * both shared regions, and one 64-byte slot of the deleted file, are changed as a function of
 * their previous contents and n (so any page or byte of a later or earlier state shows in the
 * checksums); then the tick line. With a child, the parent then writes record n into the pipe
 * and rings the doorbell: the child reads record n-1 (the one that was in flight), checks it,
 * changes every page of its own heap and prints its line. The same state always prints the
 * same lines: a resumed copy must print exactly what the original printed for the same tick.
 * End of input ends it.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define SHARED_LEN (1 << 20)
#define OWN_LEN (256 << 10)
#define SLOTS 16
#define RECORD 64

static uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

/* Changes one word per page; returns an FNV hash over those words. */
static uint64_t step(uint64_t *words, size_t len, uint64_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < len / 8; i += 512) {
        words[i] = words[i] * 0x100000001b3ULL + n;
        h ^= words[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static uint64_t hash_bytes(const unsigned char *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static void die(const char *what)
{
    fprintf(stderr, "forked: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void full_write(int fd, const void *p, size_t n)
{
    if (write(fd, p, n) != (ssize_t)n)
        die("write");
}

static int full_read(int fd, void *p, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)p + got, n - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        got += (size_t)r;
    }
    return 0;
}

static void make_record(unsigned char *rec, uint64_t k)
{
    uint64_t s = 0x9E3779B97F4A7C15ULL ^ (k + 1);
    for (int i = 0; i < RECORD; i += 8) {
        uint64_t v = (i == 0) ? k : xorshift64(&s);
        memcpy(rec + i, &v, 8);
    }
}

static void child_loop(int data, int bell, uint64_t *shared, size_t mib)
{
    size_t len = mib << 20;
    uint64_t *heap = malloc(len);
    if (!heap)
        die("malloc");
    uint64_t s = 12345;
    for (size_t i = 0; i < len / 8; i++)
        heap[i] = xorshift64(&s);
    printf("child-ready pid=%d\n", (int)getpid());
    for (;;) {
        char b;
        if (full_read(bell, &b, 1) < 0)
            exit(0);
        unsigned char rec[RECORD], want[RECORD];
        if (full_read(data, rec, RECORD) < 0)
            exit(0);
        uint64_t k;
        memcpy(&k, rec, 8);
        make_record(want, k);
        int ok = memcmp(rec, want, RECORD) == 0;
        uint64_t h = step(heap, len, k);
        uint64_t sh = hash_bytes((const unsigned char *)shared, SHARED_LEN);
        printf("child %llu pid=%d ppid=%d heap=%016llx shared=%016llx rec=%s\n", (unsigned long long)k,
               (int)getpid(), (int)getppid(), (unsigned long long)h, (unsigned long long)sh, ok ? "ok" : "bad");
    }
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 4) {
        fprintf(stderr, "usage: %s <MiB of heap> <children: 0 or 1> <directory>\n", argv[0]);
        return 2;
    }
    size_t mib = strtoul(argv[1], NULL, 10);
    int children = atoi(argv[2]);
    size_t len = (mib ? mib : 1) << 20;

    uint64_t *heap = malloc(len);
    if (!heap)
        die("malloc");
    uint64_t s = 0x243F6A8885A308D3ULL;
    for (size_t i = 0; i < len / 8; i++)
        heap[i] = xorshift64(&s);

    uint64_t *shared = mmap(NULL, SHARED_LEN, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED)
        die("mmap shared");
    for (size_t i = 0; i < SHARED_LEN / 8; i++)
        shared[i] = xorshift64(&s);

    char path[4096];
    snprintf(path, sizeof path, "%s/forked-deleted-%d", argv[3], (int)getpid());
    int file = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (file < 0)
        die("open");
    if (unlink(path) < 0)
        die("unlink");
    unsigned char slots[SLOTS * RECORD];
    for (size_t i = 0; i < sizeof slots; i++)
        slots[i] = (unsigned char)xorshift64(&s);
    if (pwrite(file, slots, sizeof slots, 0) != (ssize_t)sizeof slots)
        die("pwrite");

    int data[2] = {-1, -1}, bell[2] = {-1, -1};
    if (children) {
        if (pipe(data) < 0 || pipe(bell) < 0)
            die("pipe");
        pid_t pid = fork();
        if (pid < 0)
            die("fork");
        if (pid == 0) {
            close(data[1]);
            close(bell[1]);
            close(file);
            child_loop(data[0], bell[0], shared, mib ? mib : 1);
        }
        close(data[0]);
        close(bell[0]);
        unsigned char rec[RECORD];
        make_record(rec, 0);
        full_write(data[1], rec, RECORD);
    }

    uint64_t *own = mmap(NULL, OWN_LEN, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (own == MAP_FAILED)
        die("mmap own");
    for (size_t i = 0; i < OWN_LEN / 8; i++)
        own[i] = xorshift64(&s);

    printf("ready pid=%d children=%d\n", (int)getpid(), children);
    char line[256];
    for (uint64_t n = 1; fgets(line, sizeof line, stdin); n++) {
        uint64_t h = step(heap, len, n);
        uint64_t sh = step(shared, SHARED_LEN, n);
        uint64_t ow = step(own, OWN_LEN, n);
        unsigned char slot[RECORD];
        off_t at = (off_t)(n % SLOTS) * RECORD;
        if (pread(file, slot, RECORD, at) != RECORD)
            die("pread");
        for (int i = 0; i < RECORD; i++)
            slot[i] = (unsigned char)(slot[i] * 31 + n + i);
        if (pwrite(file, slot, RECORD, at) != RECORD)
            die("pwrite");
        unsigned char all[SLOTS * RECORD];
        if (pread(file, all, sizeof all, 0) != (ssize_t)sizeof all)
            die("pread");
        int w = (int)waitpid(-1, NULL, WNOHANG);
        printf("tick %llu pid=%d heap=%016llx shared=%016llx own=%016llx file=%016llx wait=%d\n",
               (unsigned long long)n, (int)getpid(), (unsigned long long)h, (unsigned long long)sh,
               (unsigned long long)ow, (unsigned long long)hash_bytes(all, sizeof all), w);
        if (children) {
            unsigned char rec[RECORD];
            make_record(rec, n);
            full_write(data[1], rec, RECORD);
            full_write(bell[1], "x", 1);
        }
    }
    return 0;
}
