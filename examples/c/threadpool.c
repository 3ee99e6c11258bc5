/* threadpool: many kinds of pthread state that must survive a checkpoint, each observable.
 *
 * usage: threadpool
 *
 * Threads (each names itself with pthread_setname_np; main checks the names every tick):
 *   tp-work0..3  increment a mutex-protected global counter, their own __thread counter and a
 *                per-thread struct held in pthread_setspecific data; each publishes its __thread
 *                count in its own slot and returns it from the thread function
 *   tp-ping      condition-variable ping-pong with tp-pong (strict turn-taking), counting pings
 *   tp-pong      the other side, counting pongs
 *   tp-sem       blocked in sem_wait; main posts the semaphore every tick
 *   tp-timed     pthread_cond_timedwait with 50 ms timeouts on a condition nobody signals,
 *                counting timeouts
 *   tp-sig       has a SIGUSR1 handler run on it: main pthread_kill()s it every tick, the
 *                handler increments a __thread counter
 *   tp-hold      on `hold`, locks the robust and the error-checking mutex and keeps them until
 *                `release` (so a checkpoint can happen while they are held)
 *   tp-stdin     reads commands
 * Every tick main also exercises a robust mutex (PTHREAD_MUTEX_ROBUST) and an error-checking
 * mutex: timed lock (must succeed), relock of the error-checking one (must be EDEADLK), unlock
 * (must succeed), second unlock (must be EPERM). Failures are counted in merr= and described
 * in a `BAD ...` line.
 *
 * Output (stdout, line buffered, one line per event):
 *   ready pid=<getpid> ppid=<getppid>
 *   tick <n> pid=<getpid> counter=<c> pings=<p> sems=<s> timeouts=<t> sigs=<k> names=<ok|bad>
 *       merr=<main's mutex failures so far>
 *   spawned tid=<gettid in the new thread> sys=<syscall(SYS_gettid) there>     (on `spawn`)
 *   spawn ok=<1|0> rc=<pthread_create rc> ret=<1 if the thread's return value matched>
 *   held robust=<lock rc> errchk=<lock rc>                                       (on `hold`)
 *   released relock=<errchk relock rc, EDEADLK expected> robust=<unlock rc> errchk=<unlock rc>
 *       ok=<1|0>                                                                 (on `release`)
 *   BAD <what>                                                   (any failed check, as it happens)
 *   joined ok=<1|0> counter=<c> workers=<sum of returns> pings=<p> pongs=<q> sems=<s>
 *       timeouts=<t> sigs=<k> sent=<signals sent> merr=<m> herr=<holder failures>     (on `stop`)
 * Commands (stdin, one per line): stop, spawn, hold, release. `stop` joins every thread,
 * checking each return value against what the thread published, prints `joined`, and exits 0
 * (1 if any check failed). EOF on stdin behaves like `stop`.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NWORKERS 4
#define TICK_MS 100

static atomic_int stop_flag;     /* threads leave their loops */
static atomic_int stop_request;  /* set by tp-stdin, seen by main */
static atomic_int bad_seen;      /* any check failed */

/* Workers. */
static pthread_mutex_t counter_mu = PTHREAD_MUTEX_INITIALIZER;
static uint64_t counter;
static __thread uint64_t tls_count;
static atomic_uint_fast64_t worker_slot[NWORKERS];
static pthread_key_t tsd_key;
struct tsd {
    int index;
    uint64_t count;
    uint64_t magic;
};
#define TSD_MAGIC 0x5eed5eed5eed5eedULL

/* Ping-pong. */
static pthread_mutex_t pp_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pp_cv = PTHREAD_COND_INITIALIZER;
static int turn; /* 0: ping's turn, 1: pong's turn */
static atomic_uint_fast64_t pings, pongs;

/* Semaphore. */
static sem_t sem;
static atomic_uint_fast64_t sems, posts;

/* Timed wait. */
static pthread_mutex_t tw_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t tw_cv = PTHREAD_COND_INITIALIZER;
static atomic_uint_fast64_t timeouts;

/* Signals. */
static __thread uint64_t tls_sigs;
static atomic_uint_fast64_t sigs, sigs_sent;

/* Robust and error-checking mutexes. */
static pthread_mutex_t robust_mu, errchk_mu;
static atomic_uint_fast64_t merr, herr;
static pthread_mutex_t hold_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t hold_cv = PTHREAD_COND_INITIALIZER;
static int hold_cmd; /* 0 none, 1 hold, 2 release (under hold_mu) */
static int holding;  /* tp-hold has (or is taking) the mutexes (under hold_mu) */

enum { T_W0, T_W1, T_W2, T_W3, T_PING, T_PONG, T_SEM, T_TIMED, T_SIG, T_HOLD, NTHREADS };
static const char *const names[NTHREADS] = {"tp-work0", "tp-work1", "tp-work2", "tp-work3", "tp-ping",
                                            "tp-pong",  "tp-sem",   "tp-timed", "tp-sig",   "tp-hold"};
static pthread_t threads[NTHREADS];
static pthread_barrier_t start_barrier;

static void bad(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void bad(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    atomic_store(&bad_seen, 1);
    printf("BAD %s\n", buf);
}

static void sleep_ms(long ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static struct timespec deadline_ms(long ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += (ms % 1000) * 1000000L;
    ts.tv_sec += ms / 1000 + ts.tv_nsec / 1000000000L;
    ts.tv_nsec %= 1000000000L;
    return ts;
}

static void name_self(int which)
{
    int rc = pthread_setname_np(pthread_self(), names[which]);
    if (rc != 0)
        bad("setname %s rc=%d", names[which], rc);
    pthread_barrier_wait(&start_barrier);
}

static void *worker(void *arg)
{
    int i = (int)(intptr_t)arg;
    name_self(i);
    struct tsd *t = malloc(sizeof *t);
    if (!t)
        abort();
    t->index = i;
    t->count = 0;
    t->magic = TSD_MAGIC;
    pthread_setspecific(tsd_key, t);
    while (!atomic_load(&stop_flag)) {
        pthread_mutex_lock(&counter_mu);
        counter++;
        tls_count++;
        struct tsd *mine = pthread_getspecific(tsd_key);
        if (mine != t || mine->index != i || mine->magic != TSD_MAGIC)
            bad("worker %d thread-specific data changed: %p index=%d", i, (void *)mine, mine ? mine->index : -1);
        else
            mine->count++;
        atomic_store(&worker_slot[i], tls_count);
        pthread_mutex_unlock(&counter_mu);
        sleep_ms(2);
    }
    if (t->count != tls_count)
        bad("worker %d tsd count=%llu tls=%llu", i, (unsigned long long)t->count, (unsigned long long)tls_count);
    return (void *)(uintptr_t)tls_count;
}

static void *pinger(void *arg)
{
    (void)arg;
    name_self(T_PING);
    uint64_t n = 0;
    for (;;) {
        pthread_mutex_lock(&pp_mu);
        while (turn != 0 && !atomic_load(&stop_flag))
            pthread_cond_wait(&pp_cv, &pp_mu);
        if (atomic_load(&stop_flag)) {
            pthread_mutex_unlock(&pp_mu);
            break;
        }
        n++;
        atomic_store(&pings, n);
        turn = 1;
        pthread_cond_broadcast(&pp_cv);
        pthread_mutex_unlock(&pp_mu);
        sleep_ms(1);
    }
    return (void *)(uintptr_t)n;
}

static void *ponger(void *arg)
{
    (void)arg;
    name_self(T_PONG);
    uint64_t n = 0;
    for (;;) {
        pthread_mutex_lock(&pp_mu);
        while (turn != 1 && !atomic_load(&stop_flag))
            pthread_cond_wait(&pp_cv, &pp_mu);
        if (atomic_load(&stop_flag)) {
            pthread_mutex_unlock(&pp_mu);
            break;
        }
        n++;
        atomic_store(&pongs, n);
        if (n != atomic_load(&pings))
            bad("pong %llu answers ping %llu", (unsigned long long)n, (unsigned long long)atomic_load(&pings));
        turn = 0;
        pthread_cond_broadcast(&pp_cv);
        pthread_mutex_unlock(&pp_mu);
    }
    return (void *)(uintptr_t)n;
}

/* Counts every sem_wait that returned, the last one (which saw stop_flag) included. */
static void *sem_waiter(void *arg)
{
    (void)arg;
    name_self(T_SEM);
    uint64_t n = 0;
    for (;;) {
        if (sem_wait(&sem) != 0) {
            if (errno != EINTR)
                bad("sem_wait errno=%d", errno);
            continue;
        }
        n++;
        if (atomic_load(&stop_flag))
            break;
        atomic_store(&sems, n);
    }
    return (void *)(uintptr_t)n;
}

static void *timed_waiter(void *arg)
{
    (void)arg;
    name_self(T_TIMED);
    uint64_t n = 0;
    pthread_mutex_lock(&tw_mu);
    while (!atomic_load(&stop_flag)) {
        struct timespec dl = deadline_ms(50);
        int rc = pthread_cond_timedwait(&tw_cv, &tw_mu, &dl);
        if (rc == ETIMEDOUT) {
            n++;
            atomic_store(&timeouts, n);
        } else if (rc != 0) {
            bad("pthread_cond_timedwait rc=%d", rc);
        }
    }
    pthread_mutex_unlock(&tw_mu);
    return (void *)(uintptr_t)n;
}

static void on_usr1(int sig)
{
    (void)sig;
    tls_sigs++;
}

static void *sig_thread(void *arg)
{
    (void)arg;
    name_self(T_SIG);
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    pthread_sigmask(SIG_UNBLOCK, &usr1, NULL);
    while (!atomic_load(&stop_flag)) {
        sleep_ms(5);
        atomic_store(&sigs, tls_sigs);
    }
    pthread_sigmask(SIG_BLOCK, &usr1, NULL);
    atomic_store(&sigs, tls_sigs);
    return (void *)(uintptr_t)tls_sigs;
}

static void *holder(void *arg)
{
    (void)arg;
    name_self(T_HOLD);
    pthread_mutex_lock(&hold_mu);
    for (;;) {
        while (hold_cmd != 1 && !atomic_load(&stop_flag))
            pthread_cond_wait(&hold_cv, &hold_mu);
        if (atomic_load(&stop_flag))
            break;
        struct timespec dl = deadline_ms(1000);
        int r1 = pthread_mutex_timedlock(&robust_mu, &dl);
        int r2 = pthread_mutex_timedlock(&errchk_mu, &dl);
        printf("held robust=%d errchk=%d\n", r1, r2);
        if (r1 != 0 || r2 != 0) {
            atomic_fetch_add(&herr, 1);
            bad("holder lock robust=%d errchk=%d", r1, r2);
        }
        while (hold_cmd != 2 && !atomic_load(&stop_flag))
            pthread_cond_wait(&hold_cv, &hold_mu);
        /* The error-checking mutex knows its owner: relocking must say EDEADLK, not block. */
        dl = deadline_ms(500);
        int relock = pthread_mutex_timedlock(&errchk_mu, &dl);
        int u1 = r1 == 0 ? pthread_mutex_unlock(&robust_mu) : -1;
        int u2 = r2 == 0 ? pthread_mutex_unlock(&errchk_mu) : -1;
        int ok = relock == EDEADLK && u1 == 0 && u2 == 0;
        printf("released relock=%d robust=%d errchk=%d ok=%d\n", relock, u1, u2, ok);
        if (!ok) {
            atomic_fetch_add(&herr, 1);
            bad("holder relock=%d (EDEADLK=%d) unlock robust=%d errchk=%d", relock, EDEADLK, u1, u2);
        }
        hold_cmd = 0;
        holding = 0;
        if (atomic_load(&stop_flag))
            break;
    }
    pthread_mutex_unlock(&hold_mu);
    return (void *)(uintptr_t)atomic_load(&herr);
}

static void set_hold_cmd(int cmd)
{
    pthread_mutex_lock(&hold_mu);
    if (cmd == 1)
        holding = 1;
    hold_cmd = cmd;
    pthread_cond_broadcast(&hold_cv);
    pthread_mutex_unlock(&hold_mu);
}

static void *spawned(void *arg)
{
    pthread_setname_np(pthread_self(), "tp-spawned");
    printf("spawned tid=%d sys=%ld\n", (int)gettid(), (long)syscall(SYS_gettid));
    return (void *)((uintptr_t)arg * 3 + 1);
}

static void *stdin_thread(void *arg)
{
    (void)arg;
    pthread_setname_np(pthread_self(), "tp-stdin");
    char line[128];
    uintptr_t spawns = 0;
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\r\n")] = 0;
        if (strcmp(line, "stop") == 0) {
            break;
        } else if (strcmp(line, "spawn") == 0) {
            pthread_t t;
            void *ret = NULL;
            spawns++;
            int rc = pthread_create(&t, NULL, spawned, (void *)spawns);
            int jrc = rc == 0 ? pthread_join(t, &ret) : -1;
            int ret_ok = jrc == 0 && (uintptr_t)ret == spawns * 3 + 1;
            printf("spawn ok=%d rc=%d join=%d ret=%d\n", rc == 0 && ret_ok, rc, jrc, ret_ok);
            if (!(rc == 0 && ret_ok))
                bad("spawn rc=%d join=%d ret=%p", rc, jrc, ret);
        } else if (strcmp(line, "hold") == 0) {
            set_hold_cmd(1);
        } else if (strcmp(line, "release") == 0) {
            set_hold_cmd(2);
        } else {
            printf("unknown %s\n", line);
        }
    }
    atomic_store(&stop_request, 1);
    return NULL;
}

/* Main's per-tick exercise of the robust and error-checking mutexes. Done under hold_mu, so
 * tp-hold cannot take them meanwhile; skipped while tp-hold holds them. */
static void exercise_mutexes_locked(void);
static void exercise_mutexes(void)
{
    pthread_mutex_lock(&hold_mu);
    if (!holding)
        exercise_mutexes_locked();
    pthread_mutex_unlock(&hold_mu);
}

static void exercise_mutexes_locked(void)
{
    struct timespec dl = deadline_ms(1000);
    int r = pthread_mutex_timedlock(&robust_mu, &dl);
    if (r == EOWNERDEAD) {
        pthread_mutex_consistent(&robust_mu);
        atomic_fetch_add(&merr, 1);
        bad("robust mutex owner died");
        r = 0;
    }
    if (r != 0) {
        atomic_fetch_add(&merr, 1);
        bad("robust lock rc=%d", r);
    } else if ((r = pthread_mutex_unlock(&robust_mu)) != 0) {
        atomic_fetch_add(&merr, 1);
        bad("robust unlock rc=%d", r);
    }
    dl = deadline_ms(1000);
    r = pthread_mutex_timedlock(&errchk_mu, &dl);
    if (r != 0) {
        atomic_fetch_add(&merr, 1);
        bad("errchk lock rc=%d", r);
        return;
    }
    int again = pthread_mutex_lock(&errchk_mu);
    int u1 = pthread_mutex_unlock(&errchk_mu);
    int u2 = pthread_mutex_unlock(&errchk_mu);
    if (again != EDEADLK || u1 != 0 || u2 != EPERM) {
        atomic_fetch_add(&merr, 1);
        bad("errchk relock=%d (want EDEADLK) unlock=%d unlock-again=%d (want EPERM)", again, u1, u2);
    }
}

static int names_ok(void)
{
    for (int i = 0; i < NTHREADS; i++) {
        char buf[32] = "";
        int rc = pthread_getname_np(threads[i], buf, sizeof buf);
        if (rc != 0 || strcmp(buf, names[i]) != 0) {
            bad("name of thread %d is %s (rc=%d), expected %s", i, buf, rc, names[i]);
            return 0;
        }
    }
    return 1;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    /* Only tp-sig takes SIGUSR1; every thread inherits this mask. */
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &usr1, NULL);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR1, &sa, NULL) != 0) {
        perror("threadpool: sigaction");
        return 1;
    }

    pthread_mutexattr_t ma;
    pthread_mutexattr_init(&ma);
    pthread_mutexattr_setrobust(&ma, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&robust_mu, &ma);
    pthread_mutexattr_destroy(&ma);
    pthread_mutexattr_init(&ma);
    pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_ERRORCHECK);
    pthread_mutex_init(&errchk_mu, &ma);
    pthread_mutexattr_destroy(&ma);
    if (pthread_key_create(&tsd_key, free) != 0 || sem_init(&sem, 0, 0) != 0) {
        perror("threadpool: key/sem");
        return 1;
    }
    pthread_barrier_init(&start_barrier, NULL, NTHREADS + 1);

    printf("ready pid=%d ppid=%d\n", (int)getpid(), (int)getppid());
    void *(*fns[NTHREADS])(void *) = {worker, worker,       worker,     worker,  pinger,
                                      ponger, sem_waiter, timed_waiter, sig_thread, holder};
    for (int i = 0; i < NTHREADS; i++) {
        int rc = pthread_create(&threads[i], NULL, fns[i], (void *)(intptr_t)i);
        if (rc != 0) {
            fprintf(stderr, "threadpool: pthread_create %s: %s\n", names[i], strerror(rc));
            return 1;
        }
    }
    pthread_barrier_wait(&start_barrier);
    pthread_t stdin_th;
    if (pthread_create(&stdin_th, NULL, stdin_thread, NULL) != 0) {
        fprintf(stderr, "threadpool: pthread_create stdin\n");
        return 1;
    }

    for (uint64_t n = 1; !atomic_load(&stop_request); n++) {
        sleep_ms(TICK_MS);
        sem_post(&sem);
        atomic_fetch_add(&posts, 1);
        pthread_kill(threads[T_SIG], SIGUSR1);
        atomic_fetch_add(&sigs_sent, 1);
        exercise_mutexes();
        pthread_mutex_lock(&counter_mu);
        uint64_t c = counter;
        pthread_mutex_unlock(&counter_mu);
        int nm = names_ok();
        printf("tick %llu pid=%d counter=%llu pings=%llu sems=%llu timeouts=%llu sigs=%llu names=%s merr=%llu\n",
               (unsigned long long)n, (int)getpid(), (unsigned long long)c, (unsigned long long)atomic_load(&pings),
               (unsigned long long)atomic_load(&sems), (unsigned long long)atomic_load(&timeouts),
               (unsigned long long)atomic_load(&sigs), nm ? "ok" : "bad", (unsigned long long)atomic_load(&merr));
    }

    /* Let the last signal arrive (bounded) before stopping its thread. */
    for (int i = 0; i < 200 && atomic_load(&sigs) != atomic_load(&sigs_sent); i++)
        sleep_ms(10);
    pthread_mutex_lock(&hold_mu);
    int was_holding = holding;
    pthread_mutex_unlock(&hold_mu);
    if (was_holding)
        set_hold_cmd(2);
    atomic_store(&stop_flag, 1);
    pthread_mutex_lock(&pp_mu);
    pthread_cond_broadcast(&pp_cv);
    pthread_mutex_unlock(&pp_mu);
    pthread_mutex_lock(&tw_mu);
    pthread_cond_broadcast(&tw_cv);
    pthread_mutex_unlock(&tw_mu);
    pthread_mutex_lock(&hold_mu);
    pthread_cond_broadcast(&hold_cv);
    pthread_mutex_unlock(&hold_mu);
    sem_post(&sem);
    atomic_fetch_add(&posts, 1);

    int ok = 1;
    uint64_t ret[NTHREADS];
    for (int i = 0; i < NTHREADS; i++) {
        void *r = NULL;
        int rc = pthread_join(threads[i], &r);
        if (rc != 0) {
            bad("join %s rc=%d", names[i], rc);
            ok = 0;
        }
        ret[i] = (uint64_t)(uintptr_t)r;
    }
    pthread_join(stdin_th, NULL);

    uint64_t workers = 0;
    for (int i = 0; i < NWORKERS; i++) {
        workers += ret[i];
        if (ret[i] != atomic_load(&worker_slot[i]) || ret[i] == 0) {
            bad("worker %d returned %llu, published %llu", i, (unsigned long long)ret[i],
                (unsigned long long)atomic_load(&worker_slot[i]));
            ok = 0;
        }
    }
    if (workers != counter) {
        bad("workers returned %llu in all, counter=%llu", (unsigned long long)workers, (unsigned long long)counter);
        ok = 0;
    }
    if (ret[T_PING] != atomic_load(&pings) || ret[T_PONG] != atomic_load(&pongs) ||
        !(ret[T_PING] == ret[T_PONG] || ret[T_PING] == ret[T_PONG] + 1) || ret[T_PING] == 0) {
        bad("ping returned %llu (published %llu), pong returned %llu (published %llu)", (unsigned long long)ret[T_PING],
            (unsigned long long)atomic_load(&pings), (unsigned long long)ret[T_PONG],
            (unsigned long long)atomic_load(&pongs));
        ok = 0;
    }
    int left = -1;
    sem_getvalue(&sem, &left);
    if (ret[T_SEM] + (uint64_t)left != atomic_load(&posts)) {
        bad("sem waiter took %llu, %d left, %llu posted", (unsigned long long)ret[T_SEM], left,
            (unsigned long long)atomic_load(&posts));
        ok = 0;
    }
    if (ret[T_TIMED] != atomic_load(&timeouts) || ret[T_TIMED] == 0) {
        bad("timed waiter returned %llu, published %llu", (unsigned long long)ret[T_TIMED],
            (unsigned long long)atomic_load(&timeouts));
        ok = 0;
    }
    if (ret[T_SIG] != atomic_load(&sigs_sent)) {
        bad("signal thread handled %llu SIGUSR1, %llu sent", (unsigned long long)ret[T_SIG],
            (unsigned long long)atomic_load(&sigs_sent));
        ok = 0;
    }
    if (ret[T_HOLD] != 0 || atomic_load(&merr) != 0 || atomic_load(&bad_seen))
        ok = 0;
    printf("joined ok=%d counter=%llu workers=%llu pings=%llu pongs=%llu sems=%llu timeouts=%llu sigs=%llu "
           "sent=%llu merr=%llu herr=%llu\n",
           ok, (unsigned long long)counter, (unsigned long long)workers, (unsigned long long)ret[T_PING],
           (unsigned long long)ret[T_PONG], (unsigned long long)ret[T_SEM], (unsigned long long)ret[T_TIMED],
           (unsigned long long)ret[T_SIG], (unsigned long long)atomic_load(&sigs_sent),
           (unsigned long long)atomic_load(&merr), (unsigned long long)ret[T_HOLD]);
    return ok ? 0 : 1;
}
