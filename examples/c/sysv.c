/* sysv: a producer/consumer pair over System V IPC, for checkpoints of processes that use
 * message queues, semaphore sets and shared memory segments.
 *
 * usage: sysv <key> [count, default 60] [period ms, default 50]
 *
 * With <key> K (decimal or 0x-hex), the parent creates (IPC_CREAT|IPC_EXCL, mode 0600):
 *   - message queue K: the items, one message per item (type 1, text "item <N>");
 *   - semaphore set K+1 of two: #0 counts the items produced but not yet consumed, #1 is a
 *     mutex (initially 1) for the shared counter and for the check below;
 *   - shared memory segment K+2 (4096 bytes), attached by both processes, holding a counter
 *     that both increment, and how many increments each made.
 * Then it forks the consumer and, every period, for N = 1..count: under the mutex, sends item N
 * and raises semaphore #0, increments the counter; prints `parent sent N counter=C`.
 * The consumer waits on semaphore #0 (blocking semop), then under the mutex receives one item
 * (msgrcv), checks that it is the one after the previous and that the semaphore still equals
 * the number of queued messages, increments the counter; prints `got N ok|GAP sem=S qnum=Q
 * counter=C`. It handles the first 10 items slowly (300 ms each), so items pile up in the queue.
 * At the end the consumer prints `child done last=N` and exits 0; the parent waits for it,
 * prints `parent done counter=C parent=P child=K` (C = P + K = 2 * count when the segment was
 * shared all along), removes the three objects and exits 0.
 *
 * Output (stdout, line buffered):
 *   ready pid=<getpid> consumer=<pid> msq=<id> sem=<id> shm=<id>
 *   BAD <what> ...    a system call failed, returned early (EINTR), or a check failed
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct shared {
    long counter;
    long parent_incs;
    long child_incs;
};

struct item {
    long mtype;
    char text[64];
};

static int msq, sem;
static struct shared *shm;

static void sleep_ms(long ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
        printf("BAD nanosleep errno=%d pid=%d\n", errno, (int)getpid());
        if (errno != EINTR)
            return;
    }
}

static void sem_change(int num, int delta, const char *what)
{
    struct sembuf op = {.sem_num = (unsigned short)num, .sem_op = (short)delta, .sem_flg = 0};
    while (semop(sem, &op, 1) != 0) {
        printf("BAD semop %s errno=%d pid=%d\n", what, errno, (int)getpid());
        if (errno != EINTR)
            exit(1);
    }
}

/* Increments the shared counter (the caller holds the mutex); returns the new value. */
static long count(int parent)
{
    long c = ++shm->counter;
    if (parent)
        shm->parent_incs++;
    else
        shm->child_incs++;
    if (shm->counter != shm->parent_incs + shm->child_incs)
        printf("BAD counter %ld != %ld + %ld\n", shm->counter, shm->parent_incs, shm->child_incs);
    return c;
}

static void consumer(long n_items)
{
    long last = 0;
    for (long i = 1; i <= n_items; i++) {
        sem_change(0, -1, "wait item");
        sem_change(1, -1, "lock");
        struct item it;
        ssize_t len = msgrcv(msq, &it, sizeof it.text, 0, IPC_NOWAIT);
        if (len < 0) {
            printf("BAD msgrcv errno=%d\n", errno);
            exit(1);
        }
        long n = atol(it.text + 5);
        int s = semctl(sem, 0, GETVAL);
        struct msqid_ds ds;
        if (msgctl(msq, IPC_STAT, &ds) != 0)
            printf("BAD msgctl IPC_STAT errno=%d\n", errno);
        long c = count(0);
        printf("got %ld %s sem=%d qnum=%lu counter=%ld\n", n, n == last + 1 ? "ok" : "GAP", s,
               (unsigned long)ds.msg_qnum, c);
        if (s < 0 || (unsigned long)s != (unsigned long)ds.msg_qnum)
            printf("BAD semaphore %d but %lu messages queued\n", s, (unsigned long)ds.msg_qnum);
        last = n;
        sem_change(1, 1, "unlock");
        if (n <= 10)
            sleep_ms(300);
    }
    printf("child done last=%ld\n", last);
    exit(0);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: sysv <key> [count] [period ms]\n");
        return 2;
    }
    key_t key = (key_t)strtol(argv[1], NULL, 0);
    long n_items = argc > 2 ? atol(argv[2]) : 60;
    long period = argc > 3 ? atol(argv[3]) : 50;
    setvbuf(stdout, NULL, _IOLBF, 0);

    msq = msgget(key, IPC_CREAT | IPC_EXCL | 0600);
    sem = semget(key + 1, 2, IPC_CREAT | IPC_EXCL | 0600);
    int shmid = shmget(key + 2, 4096, IPC_CREAT | IPC_EXCL | 0600);
    if (msq < 0 || sem < 0 || shmid < 0) {
        printf("BAD create msq=%d sem=%d shm=%d errno=%d\n", msq, sem, shmid, errno);
        return 1;
    }
    unsigned short init[2] = {0, 1};
    if (semctl(sem, 0, SETALL, init) != 0) {
        printf("BAD semctl SETALL errno=%d\n", errno);
        return 1;
    }
    shm = shmat(shmid, NULL, 0);
    if (shm == (void *)-1) {
        printf("BAD shmat errno=%d\n", errno);
        return 1;
    }

    pid_t child = fork();
    if (child < 0) {
        printf("BAD fork errno=%d\n", errno);
        return 1;
    }
    if (child == 0)
        consumer(n_items);
    printf("ready pid=%d consumer=%d msq=%d sem=%d shm=%d\n", (int)getpid(), (int)child, msq, sem, shmid);

    for (long n = 1; n <= n_items; n++) {
        sem_change(1, -1, "lock");
        struct item it = {.mtype = 1};
        int len = snprintf(it.text, sizeof it.text, "item %ld", n) + 1;
        while (msgsnd(msq, &it, (size_t)len, 0) != 0) {
            printf("BAD msgsnd errno=%d\n", errno);
            if (errno != EINTR)
                return 1;
        }
        sem_change(0, 1, "post item");
        long c = count(1);
        sem_change(1, 1, "unlock");
        printf("parent sent %ld counter=%ld\n", n, c);
        sleep_ms(period);
    }
    int st;
    pid_t r;
    while ((r = waitpid(child, &st, 0)) < 0 && errno == EINTR)
        printf("BAD waitpid EINTR\n");
    if (r != child || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
        printf("BAD consumer ended: waitpid=%d status=%#x\n", (int)r, st);
    sem_change(1, -1, "lock");
    printf("parent done counter=%ld parent=%ld child=%ld\n", shm->counter, shm->parent_incs, shm->child_incs);
    sem_change(1, 1, "unlock");
    shmdt(shm);
    if (shmctl(shmid, IPC_RMID, NULL) != 0 || semctl(sem, 0, IPC_RMID) != 0 || msgctl(msq, IPC_RMID, NULL) != 0)
        printf("BAD remove errno=%d\n", errno);
    return 0;
}
