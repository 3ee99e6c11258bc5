/* sysv_private: System V objects without keys, and the awkward shapes of shared memory.
 *
 * usage: sysv_private [ticks, default 60] [period ms, default 50]
 *
 * Creates a private (IPC_PRIVATE) message queue, semaphore set of one and 3-page shared memory
 * segment; attaches the segment twice (read-write, and read-only elsewhere), marks it for
 * removal (IPC_RMID: it lives on while attached, and no key finds it any more), makes the
 * middle page of the read-write attachment read-only (mprotect splits the mapping) and puts a
 * marker in the third page; queues 3 messages ahead. Then, every period, for N = 1..ticks:
 * semop +1 then semtimedop -1 (1 s timeout); increments the counter in the first page; sends
 * message N+3 and receives the oldest one, which must be N; checks that the read-only
 * attachment sees the counter, the marker is intact and the segment's attach count is
 * unchanged; prints `tick N counter=C got=G ok|BAD`. At the end it removes the queue and the
 * semaphores (the segment goes with the last detach) and prints `done`.
 *
 * Output (stdout, line buffered):
 *   ready pid=<getpid> msq=<id> sem=<id> shm=<id>
 *   BAD <what> ...    a system call failed or returned early (EINTR)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <time.h>
#include <unistd.h>

struct item {
    long mtype;
    char text[32];
};

static void send_item(int q, long n)
{
    struct item it = {.mtype = 1};
    snprintf(it.text, sizeof it.text, "%ld", n);
    while (msgsnd(q, &it, sizeof it.text, 0) != 0) {
        printf("BAD msgsnd errno=%d\n", errno);
        if (errno != EINTR)
            exit(1);
    }
}

int main(int argc, char **argv)
{
    long ticks = argc > 1 ? atol(argv[1]) : 60;
    long period = argc > 2 ? atol(argv[2]) : 50;
    setvbuf(stdout, NULL, _IOLBF, 0);
    long page = sysconf(_SC_PAGESIZE);
    int q = msgget(IPC_PRIVATE, 0600);
    int s = semget(IPC_PRIVATE, 1, 0600);
    int m = shmget(IPC_PRIVATE, 3 * (size_t)page, 0600);
    if (q < 0 || s < 0 || m < 0) {
        printf("BAD create msq=%d sem=%d shm=%d errno=%d\n", q, s, m, errno);
        return 1;
    }
    volatile long *rw = shmat(m, NULL, 0);
    const volatile long *ro = shmat(m, NULL, SHM_RDONLY);
    if (rw == (void *)-1 || ro == (void *)-1) {
        printf("BAD shmat errno=%d\n", errno);
        return 1;
    }
    if (shmctl(m, IPC_RMID, NULL) != 0)
        printf("BAD shmctl IPC_RMID errno=%d\n", errno);
    if (mprotect((char *)rw + page, (size_t)page, PROT_READ) != 0)
        printf("BAD mprotect errno=%d\n", errno);
    long *marker = (long *)((char *)rw + 2 * page);
    *marker = 4242;
    struct shmid_ds ds0;
    if (shmctl(m, IPC_STAT, &ds0) != 0)
        printf("BAD shmctl IPC_STAT errno=%d\n", errno);
    printf("ready pid=%d msq=%d sem=%d shm=%d\n", (int)getpid(), q, s, m);
    for (long n = 1; n <= 3; n++)
        send_item(q, n);

    for (long n = 1; n <= ticks; n++) {
        struct sembuf up = {0, 1, 0}, down = {0, -1, 0};
        struct timespec timeout = {1, 0};
        if (semop(s, &up, 1) != 0)
            printf("BAD semop errno=%d\n", errno);
        if (semtimedop(s, &down, 1, &timeout) != 0)
            printf("BAD semtimedop errno=%d\n", errno);
        long c = ++rw[0];
        send_item(q, n + 3);
        struct item r;
        if (msgrcv(q, &r, sizeof r.text, 0, 0) < 0)
            printf("BAD msgrcv errno=%d\n", errno);
        long got = atol(r.text);
        struct shmid_ds ds;
        int st = shmctl(m, IPC_STAT, &ds);
        int ok = got == n && ro[0] == c && *marker == 4242 && st == 0 && ds.shm_nattch == ds0.shm_nattch;
        printf("tick %ld counter=%ld got=%ld %s\n", n, c, got, ok ? "ok" : "BAD");
        struct timespec d = {.tv_sec = period / 1000, .tv_nsec = (period % 1000) * 1000000L};
        while (nanosleep(&d, &d) != 0)
            printf("BAD nanosleep errno=%d\n", errno);
    }
    if (msgctl(q, IPC_RMID, NULL) != 0 || semctl(s, 0, IPC_RMID) != 0)
        printf("BAD remove errno=%d\n", errno);
    printf("done\n");
    return 0;
}
