/*
 * Tests of engine/pager.c: exact bytes for single and multi-segment jobs,
 * with O_DIRECT, buffered (cfg.buffered), on tmpfs, and through the
 * fallback when O_DIRECT is refused; jobs larger than chunk x depth; spans
 * past the end of the file; many jobs from several threads; registered
 * buffers (and, with MOED_TEST_EXHAUSTIVE=1, a region over the kernel's
 * 1 GiB limit per buffer); fault injection (EIO, short reads, a flipped
 * byte); a file truncated after it was added; malformed jobs and
 * configurations; freeing with jobs in flight; done callbacks that submit
 * more jobs; files removed (their descriptors and ring slots let go, their
 * ids reused); an idle pager burning no CPU; io_uring refused by seccomp.
 *
 * Files live in a fresh directory under $TMPDIR (or /tmp) when O_DIRECT
 * works there, else under the current directory (the build tree, on disk).
 */
#include "log.h"
#include "pager.h"
#include "tests.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/filter.h>
#include <linux/magic.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define AL MOE_PAGER_ALIGN
#define MAX_SEGS 8
#define FILE_SIZE ((size_t)8 * 1024 * 1024 + 12345) /* not a multiple of AL */

static char *dir;

/* ---- files ---- */

struct tfile {
    char *path;
    uint8_t *data; /* the content */
    size_t size;
};

static void tfile_make(struct tfile *f, const char *in, const char *name, size_t size,
                       uint64_t seed)
{
    int fd;

    if (asprintf(&f->path, "%s/%s", in, name) < 0)
        FAIL("asprintf");
    f->size = size;
    f->data = malloc(size + 8);
    ASSERT_TRUE(f->data != NULL);
    for (size_t i = 0; i < size; i += 8) {
        uint64_t v = test_rand_u64(&seed);

        memcpy(f->data + i, &v, 8);
    }
    fd = open(f->path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        FAIL("cannot create %s: %s", f->path, strerror(errno));
    ASSERT_EQ(write(fd, f->data, size), (ssize_t)size);
    ASSERT_EQ(fsync(fd), 0);
    close(fd);
}

static void tfile_free(struct tfile *f)
{
    unlink(f->path);
    free(f->path);
    free(f->data);
}

/* True when O_DIRECT reads work in directory d. */
static bool direct_works(const char *d)
{
    char *path;
    void *buf = NULL;
    bool ok = false;
    int fd;

    if (asprintf(&path, "%s/probe", d) < 0)
        FAIL("asprintf");
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
        char b[AL] = {1};

        ok = write(fd, b, sizeof(b)) == (ssize_t)sizeof(b);
        close(fd);
    }
    fd = ok ? open(path, O_RDONLY | O_DIRECT) : -1;
    ok = false;
    if (fd >= 0 && posix_memalign(&buf, AL, AL) == 0)
        ok = pread(fd, buf, AL, 0) == (ssize_t)AL;
    if (fd >= 0)
        close(fd);
    free(buf);
    unlink(path);
    free(path);
    return ok;
}

static void *xalloc(size_t n)
{
    void *p = NULL;

    if (posix_memalign(&p, AL, n ? n : AL) != 0)
        FAIL("posix_memalign %zu", n);
    memset(p, 0xee, n);
    return p;
}

/* ---- jobs ---- */

/* What done reported, for jobs that done frees. */
struct result {
    int calls;
    int status;
    char msg[256];
};

struct tjob {
    struct moe_pager_job job;
    struct moe_pager_seg segs[MAX_SEGS];
    void *bufs[MAX_SEGS];
    atomic_int calls;
    int status;
    char msg[256];
    atomic_int *counter; /* jobs done, for waiters */
    struct result *res;  /* when set, done copies the outcome there and
                          * frees a failed job (malloc'd) and its buffers */
};

static pthread_mutex_t done_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t done_cond = PTHREAD_COND_INITIALIZER;

static void tjob_release(struct tjob *t);

static void tjob_done(struct moe_pager_job *j, int status, const char *msg)
{
    struct tjob *t = j->arg;
    atomic_int *counter = t->counter;

    t->status = status;
    snprintf(t->msg, sizeof(t->msg), "%s", msg ? msg : "(null)");
    atomic_fetch_add_explicit(&t->calls, 1, memory_order_relaxed);
    if (t->res) {
        t->res->calls++;
        t->res->status = status;
        snprintf(t->res->msg, sizeof(t->res->msg), "%s", t->msg);
        /* The caller may free a job and its buffers in done: a read of the
         * job still in flight would show as a use after free (ASan). */
        if (status) {
            tjob_release(t);
            free(t);
        }
    }
    /* The mutex publishes what was written above to wait_count(). */
    pthread_mutex_lock(&done_lock);
    atomic_fetch_add_explicit(counter, 1, memory_order_relaxed);
    pthread_cond_broadcast(&done_cond);
    pthread_mutex_unlock(&done_lock);
}

static void wait_count(atomic_int *counter, int n)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 30;
    pthread_mutex_lock(&done_lock);
    while (atomic_load_explicit(counter, memory_order_acquire) < n) {
        if (pthread_cond_timedwait(&done_cond, &done_lock, &ts) == ETIMEDOUT)
            FAIL("timed out: %d of %d jobs done", atomic_load(counter), n);
    }
    pthread_mutex_unlock(&done_lock);
}

static void tjob_init(struct tjob *t, atomic_int *counter)
{
    memset(t, 0, sizeof(*t));
    t->job.segs = t->segs;
    t->job.done = tjob_done;
    t->job.arg = t;
    t->counter = counter;
}

/* Adds a segment of file id reading [off, off + len) with `need` bytes
 * into a fresh buffer. */
static void tjob_seg(struct tjob *t, int file, uint64_t off, uint64_t len, uint64_t need)
{
    int i = t->job.n_segs++;

    ASSERT_TRUE(i < MAX_SEGS);
    t->bufs[i] = xalloc(len);
    t->segs[i] = (struct moe_pager_seg){
        .file = file, .offset = off, .len = len, .need = need, .dst = t->bufs[i]};
}

/* Frees the job's own buffers. */
static void tjob_release(struct tjob *t)
{
    for (int i = 0; i < t->job.n_segs; i++)
        free(t->bufs[i]);
}

/* Every segment holds the file's bytes (zeros past the end of the file). */
static void tjob_check(const struct tjob *t, const struct tfile *f)
{
    ASSERT_EQ(atomic_load(&t->calls), 1);
    if (t->status != 0)
        FAIL("job failed: %d %s", t->status, t->msg);
    ASSERT_STREQ(t->msg, "");
    for (int i = 0; i < t->job.n_segs; i++) {
        const struct moe_pager_seg *s = &t->segs[i];
        const uint8_t *b = s->dst;

        for (uint64_t k = 0; k < s->len; k++) {
            uint64_t o = s->offset + k;
            uint8_t want = o < f->size ? f->data[o] : 0;

            if (b[k] != want)
                FAIL("segment %d (offset %" PRIu64 ", len %" PRIu64 "): byte %" PRIu64
                     " (file offset %" PRIu64 ") is 0x%02x, want 0x%02x",
                     i, s->offset, s->len, k, o, b[k], want);
        }
    }
}

static struct moe_pager *pager_new(const struct moe_pager_config *cfg)
{
    struct moe_error err = {0};
    struct moe_pager *p = NULL;
    int r = moe_pager_create(cfg, &p, &err);

    if (r == -ENOSYS || r == -EPERM) {
        fprintf(stderr, "skip: %s\n", err.msg);
        exit(TEST_SKIP);
    }
    if (r != 0)
        FAIL("moe_pager_create: %d %s", r, err.msg);
    return p;
}

static int add(struct moe_pager *p, const struct tfile *f)
{
    struct moe_error err = {0};
    int id = -1, r = moe_pager_add_file(p, f->path, f->size, &id, &err);

    if (r != 0)
        FAIL("moe_pager_add_file %s: %d %s", f->path, r, err.msg);
    return id;
}

static void submit(struct moe_pager *p, struct tjob *t)
{
    struct moe_error err = {0};
    int r = moe_pager_submit(p, &t->job, &err);

    if (r != 0)
        FAIL("moe_pager_submit: %d %s", r, err.msg);
}

/* Runs one job to completion. */
static void run1(struct moe_pager *p, struct tjob *t)
{
    atomic_int *c = t->counter;
    int before = atomic_load(c);

    submit(p, t);
    wait_count(c, before + 1);
}

/* ---- log capture ---- */

static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static char log_text[8192];

static void log_sink(enum moe_log_level level, const char *msg, void *arg)
{
    size_t n;

    (void)level;
    (void)arg;
    pthread_mutex_lock(&log_lock);
    n = strlen(log_text);
    snprintf(log_text + n, sizeof(log_text) - n, "%s\n", msg);
    pthread_mutex_unlock(&log_lock);
}

static void log_reset(void)
{
    pthread_mutex_lock(&log_lock);
    log_text[0] = 0;
    pthread_mutex_unlock(&log_lock);
}

/* ---- tests ---- */

/* Single and multi-segment jobs, exact bytes. */
static void test_basic(struct tfile *f, bool buffered, bool expect_direct)
{
    struct moe_pager_config cfg = {.buffered = buffered};
    struct moe_pager *p = pager_new(&cfg);
    struct moe_pager_stats st;
    atomic_int count = 0;
    struct tjob t;
    int id = add(p, f);
    static const struct {
        uint64_t off, len;
    } singles[] = {
        {0, AL},
        {0, 1 << 20},
        {7 * AL, 3 * AL},
        {AL, 2 << 20},
        {5 << 20, 3 << 20},
        {(1 << 20) - AL, 2 * AL},
        {123 * AL, 77 * AL},
    };

    ASSERT_EQ(moe_pager_file_direct(p, id), expect_direct);
    for (size_t i = 0; i < MOE_ARRAY_SIZE(singles); i++) {
        tjob_init(&t, &count);
        tjob_seg(&t, id, singles[i].off, singles[i].len, singles[i].len);
        run1(p, &t);
        tjob_check(&t, f);
        tjob_release(&t);
    }
    /* several segments, out of order, one empty */
    tjob_init(&t, &count);
    tjob_seg(&t, id, 6 << 20, 1 << 20, 1 << 20);
    tjob_seg(&t, id, 0, 3 * AL, 3 * AL);
    tjob_seg(&t, id, 40 * AL, 0, 0);
    tjob_seg(&t, id, 1 << 20, (2 << 20) + AL, (2 << 20) + AL);
    tjob_seg(&t, id, 9 * AL, AL, AL);
    run1(p, &t);
    tjob_check(&t, f);
    tjob_release(&t);
    /* no segments at all */
    tjob_init(&t, &count);
    run1(p, &t);
    ASSERT_EQ(t.status, 0);
    ASSERT_EQ(atomic_load(&t.calls), 1);

    moe_pager_get_stats(p, &st);
    ASSERT_EQ(st.jobs_done, MOE_ARRAY_SIZE(singles) + 2);
    ASSERT_EQ(st.jobs_failed, 0);
    ASSERT_EQ(st.files_buffered, expect_direct ? 0 : 1);
    ASSERT_TRUE(st.reads >= MOE_ARRAY_SIZE(singles) + 4);
    ASSERT_EQ(st.files_registered, !buffered);
    ASSERT_EQ(st.buffers_registered, false);
    moe_pager_free(p);
}

/* Jobs far larger than chunk_bytes x queue_depth, on several threads. */
static void test_big_jobs(struct tfile *f)
{
    struct moe_pager_config cfg = {.n_threads = 2, .queue_depth = 4, .chunk_bytes = 64 << 10};
    struct moe_pager *p = pager_new(&cfg);
    atomic_int count = 0;
    struct tjob t[3];
    int id = add(p, f);

    tjob_init(&t[0], &count);
    tjob_seg(&t[0], id, 0, 8 << 20, 8 << 20);
    tjob_init(&t[1], &count);
    tjob_seg(&t[1], id, AL, 3 << 20, 3 << 20);
    tjob_seg(&t[1], id, 5 << 20, (3 << 20) - AL, (3 << 20) - AL);
    /* a chunk size that does not divide the segment */
    tjob_init(&t[2], &count);
    tjob_seg(&t[2], id, 3 * AL, (1 << 20) + 5 * AL, (1 << 20) + 5 * AL);
    for (int i = 0; i < 3; i++)
        submit(p, &t[i]);
    wait_count(&count, 3);
    for (int i = 0; i < 3; i++) {
        tjob_check(&t[i], f);
        tjob_release(&t[i]);
    }
    moe_pager_free(p);
}

/* An urgent job overtakes the jobs queued before it, even one already
 * started (it is parked and resumed, and still comes out whole). */
static atomic_int urgent_seq;

static void urgent_done(struct moe_pager_job *j, int status, const char *msg)
{
    struct tjob *t = j->arg;

    /* the order it finished in, kept in a spare buffer */
    ((int *)t->bufs[MAX_SEGS - 1])[0] = atomic_fetch_add(&urgent_seq, 1);
    tjob_done(j, status, msg);
}

static void test_urgent(struct tfile *f)
{
    struct moe_pager_config cfg = {.n_threads = 1, .queue_depth = 2, .chunk_bytes = AL};
    struct moe_pager *p = pager_new(&cfg);
    atomic_int count = 0;
    struct tjob t[9];
    int id = add(p, f), order[9];

    atomic_store(&urgent_seq, 0);
    for (int i = 0; i < 9; i++) {
        tjob_init(&t[i], &count);
        tjob_seg(&t[i], id, (uint64_t)i * (256 << 10), i < 8 ? 256 << 10 : AL,
                 i < 8 ? 256 << 10 : AL);
        t[i].bufs[MAX_SEGS - 1] = xalloc(AL);
        t[i].job.done = urgent_done;
    }
    t[8].job.urgent = true;
    for (int i = 0; i < 8; i++)
        submit(p, &t[i]);
    usleep(500); /* most likely the first job is under way: it gets parked */
    submit(p, &t[8]);
    wait_count(&count, 9);
    for (int i = 0; i < 9; i++) {
        order[i] = ((int *)t[i].bufs[MAX_SEGS - 1])[0];
        tjob_check(&t[i], f);
        free(t[i].bufs[MAX_SEGS - 1]);
        tjob_release(&t[i]);
    }
    printf("urgent: the urgent job finished %d of 9\n", order[8] + 1);
    /* 8 jobs of 64 reads each, 2 in flight: the urgent one is done before
     * at least the last 6 of them. */
    ASSERT_TRUE(order[8] <= 2);
    moe_pager_free(p);
}

/* The aligned span of the file's last bytes runs past its end: only need
 * bytes must exist, the rest of the buffer is zeroed. */
static void test_past_eof(struct tfile *f, bool buffered)
{
    static const size_t chunks[] = {0, 8 * AL, AL};
    uint64_t start, span;

    for (size_t c = 0; c < MOE_ARRAY_SIZE(chunks); c++) {
        struct moe_pager_config cfg = {.buffered = buffered, .chunk_bytes = chunks[c]};
        struct moe_pager *p = pager_new(&cfg);
        struct moe_pager_stats st;
        atomic_int count = 0;
        struct tjob t;
        int id = add(p, f);

        /* the last tensor: 100000 bytes ending at the end of the file */
        moe_pager_span(f->size - 100000, 100000, &start, &span);
        tjob_init(&t, &count);
        tjob_seg(&t, id, start, span, f->size - start);
        run1(p, &t);
        tjob_check(&t, f);
        tjob_release(&t);
        /* a segment asking for more than the file holds, needing only
         * what is there (reads wholly past the end come back empty) */
        tjob_init(&t, &count);
        tjob_seg(&t, id, 8 << 20, 1 << 20, f->size - (8 << 20));
        run1(p, &t);
        tjob_check(&t, f);
        tjob_release(&t);
        moe_pager_get_stats(p, &st);
        /* with O_DIRECT the read at the end comes back short of an
         * aligned length and is read again from the aligned start */
        ASSERT_TRUE(st.short_reads > 0);
        ASSERT_EQ(st.jobs_failed, 0);
        /* needing one byte more than the file has fails */
        tjob_init(&t, &count);
        tjob_seg(&t, id, start, span, f->size - start + 1);
        run1(p, &t);
        ASSERT_EQ(t.status, -EIO);
        ASSERT_CONTAINS(t.msg, "truncated");
        tjob_release(&t);
        moe_pager_free(p);
    }
}

struct thread_arg {
    struct moe_pager *p;
    const struct tfile *f;
    int id;
    uint64_t seed;
};

static void *submitter(void *arg)
{
    struct thread_arg *a = arg;
    enum { N = 48 };
    struct tjob *t = calloc(N, sizeof(*t));
    atomic_int count = 0;
    uint64_t s = a->seed;
    uint64_t pages = (a->f->size + AL - 1) / AL;

    ASSERT_TRUE(t != NULL);
    for (int i = 0; i < N; i++) {
        int nseg = 1 + (int)(test_rand_u64(&s) % 3);

        tjob_init(&t[i], &count);
        for (int k = 0; k < nseg; k++) {
            uint64_t len = (1 + test_rand_u64(&s) % 96) * AL;
            uint64_t off = (test_rand_u64(&s) % pages) * AL;
            uint64_t need = MOE_MIN(len, a->f->size - off);

            tjob_seg(&t[i], a->id, off, len, need);
        }
        submit(a->p, &t[i]);
        if (i % 7 == 0)
            usleep(100);
    }
    wait_count(&count, N);
    for (int i = 0; i < N; i++) {
        tjob_check(&t[i], a->f);
        tjob_release(&t[i]);
    }
    free(t);
    return NULL;
}

/* Many jobs submitted from 4 threads at once. */
static void test_concurrent(struct tfile *f)
{
    struct moe_pager_config cfg = {.n_threads = 3, .queue_depth = 8, .chunk_bytes = 128 << 10};
    struct moe_pager *p = pager_new(&cfg);
    struct thread_arg a[4];
    pthread_t th[4];
    struct moe_pager_stats st;
    int id = add(p, f);

    for (int i = 0; i < 4; i++) {
        a[i] = (struct thread_arg){.p = p, .f = f, .id = id, .seed = 1000 + (uint64_t)i};
        ASSERT_EQ(pthread_create(&th[i], NULL, submitter, &a[i]), 0);
    }
    for (int i = 0; i < 4; i++)
        ASSERT_EQ(pthread_join(th[i], NULL), 0);
    moe_pager_get_stats(p, &st);
    ASSERT_EQ(st.jobs_done, 4 * 48);
    ASSERT_EQ(st.jobs_failed, 0);
    moe_pager_free(p);
}

/* Reads into registered regions (and outside them) give the same bytes. */
static void test_regions(struct tfile *f, bool buffered)
{
    size_t rlen = 6 << 20;
    uint8_t *map = mmap(NULL, 2 * rlen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint8_t *region = map, *region2 = map + rlen;
    /* out of address order, with an empty one */
    struct iovec iov[3] = {{region2, rlen}, {NULL, 0}, {region, rlen}};
    struct moe_pager_config cfg = {
        .buffered = buffered, .chunk_bytes = 256 << 10, .regions = iov, .n_regions = 3};
    struct moe_pager *p;
    struct moe_pager_stats st;
    atomic_int count = 0;
    struct tjob t;
    int id;

    ASSERT_TRUE(map != MAP_FAILED);
    p = pager_new(&cfg);
    id = add(p, f);
    moe_pager_get_stats(p, &st);
    ASSERT_TRUE(st.buffers_registered);
    ASSERT_EQ(st.files_registered, !buffered);

    tjob_init(&t, &count);
    t.job.n_segs = 4;
    t.segs[0] = (struct moe_pager_seg){id, 0, 2 << 20, 2 << 20, region};
    t.segs[1] = (struct moe_pager_seg){id, 3 << 20, 1 << 20, 1 << 20, region + (3 << 20)};
    t.segs[2] = (struct moe_pager_seg){id, 4 << 20, 4 << 20, 4 << 20, region2 + (1 << 20)};
    /* across the boundary of two regions: read unregistered */
    t.segs[3] = (struct moe_pager_seg){id, 5 << 20, 2 * AL, 2 * AL, region + rlen - AL};
    run1(p, &t);
    tjob_check(&t, f);
    /* outside any region */
    tjob_init(&t, &count);
    tjob_seg(&t, id, 2 << 20, 1 << 20, 1 << 20);
    run1(p, &t);
    tjob_check(&t, f);
    tjob_release(&t);
    moe_pager_free(p);

    /* no_register: nothing registered, same bytes */
    cfg.no_register = true;
    p = pager_new(&cfg);
    id = add(p, f);
    moe_pager_get_stats(p, &st);
    ASSERT_TRUE(!st.buffers_registered);
    ASSERT_TRUE(!st.files_registered);
    tjob_init(&t, &count);
    t.job.n_segs = 1;
    memset(region, 0, rlen);
    t.segs[0] = (struct moe_pager_seg){id, AL, 3 << 20, 3 << 20, region};
    run1(p, &t);
    tjob_check(&t, f);
    moe_pager_free(p);
    munmap(map, 2 * rlen);
}

/* MemAvailable in bytes, 0 when unknown. */
static uint64_t mem_available(void)
{
    FILE *fp = fopen("/proc/meminfo", "r");
    char line[256];
    uint64_t kb = 0;

    while (fp && fgets(line, sizeof(line), fp))
        if (sscanf(line, "MemAvailable: %" SCNu64 " kB", &kb) == 1)
            break;
    if (fp)
        fclose(fp);
    return kb * 1024;
}

/* A region over the kernel's 1 GiB limit per registered buffer is
 * registered in pieces; reads inside a piece, and across the boundary
 * between two, give the right bytes.  Registering pins the whole region,
 * which takes a second or two on a VM: only with MOED_TEST_EXHAUSTIVE=1. */
static void test_big_region(struct tfile *f)
{
    const char *e = getenv("MOED_TEST_EXHAUSTIVE");
    size_t rlen = ((size_t)1 << 30) + (8 << 20);
    uint8_t *region;
    struct iovec iov;
    struct moe_pager *p;
    struct moe_pager_stats st;
    atomic_int count = 0;
    struct tjob t;
    int id;

    if (!e || strcmp(e, "1") != 0)
        return;
    /* registering pins (and so allocates) the whole region */
    if (mem_available() < ((uint64_t)4 << 30)) {
        fprintf(stderr, "note: less than 4 GiB available, big region not tested\n");
        return;
    }
    region = mmap(NULL, rlen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ASSERT_TRUE(region != MAP_FAILED);
    /* huge pages where the kernel has them: pinning is then far quicker */
    madvise(region, rlen, MADV_HUGEPAGE);
    iov = (struct iovec){region, rlen};
    p = pager_new(&(struct moe_pager_config){.regions = &iov, .n_regions = 1});
    id = add(p, f);
    moe_pager_get_stats(p, &st);
    ASSERT_TRUE(st.buffers_registered);
    tjob_init(&t, &count);
    t.job.n_segs = 3;
    /* the first piece, across the boundary, the second piece */
    t.segs[0] = (struct moe_pager_seg){id, 0, 1 << 20, 1 << 20, region};
    t.segs[1] =
        (struct moe_pager_seg){id, 1 << 20, 2 << 20, 2 << 20, region + (1 << 30) - (1 << 20)};
    t.segs[2] =
        (struct moe_pager_seg){id, 4 << 20, 4 << 20, 4 << 20, region + (1 << 30) + (2 << 20)};
    run1(p, &t);
    tjob_check(&t, f);
    moe_pager_free(p);
    munmap(region, rlen);
}

/* Runs n jobs of 256 KiB (4 reads of 64 KiB each) on one thread with the
 * given faults.  Failed jobs are freed by done (t[i] is then NULL) and
 * their outcome is in res[i]; returns how many failed. */
static int run_faulty(struct tfile *f, bool buffered, const struct moe_pager_faults *faults, int n,
                      struct tjob **t, struct result *res, struct moe_pager_stats *st)
{
    struct moe_pager_config cfg = {
        .buffered = buffered, .queue_depth = 4, .chunk_bytes = 64 << 10, .faults = *faults};
    struct moe_pager *p = pager_new(&cfg);
    atomic_int count = 0;
    int id = add(p, f), failed = 0;

    for (int i = 0; i < n; i++) {
        t[i] = malloc(sizeof(*t[i]));
        ASSERT_TRUE(t[i] != NULL);
        tjob_init(t[i], &count);
        memset(&res[i], 0, sizeof(res[i]));
        t[i]->res = &res[i];
        tjob_seg(t[i], id, (uint64_t)i * (256 << 10), 256 << 10, 256 << 10);
    }
    for (int i = 0; i < n; i++)
        submit(p, t[i]);
    wait_count(&count, n);
    for (int i = 0; i < n; i++) {
        ASSERT_EQ(res[i].calls, 1);
        if (res[i].status) {
            t[i] = NULL;
            failed++;
        }
    }
    moe_pager_get_stats(p, st);
    ASSERT_EQ(st->jobs_failed, failed);
    ASSERT_EQ(st->jobs_done, n - failed);
    moe_pager_free(p);
    return failed;
}

static void tjob_destroy(struct tjob *t)
{
    if (t) {
        tjob_release(t);
        free(t);
    }
}

/* The 3rd read fails: its job fails with EIO naming the file and offset;
 * the other jobs are whole. */
static void test_fail_nth(struct tfile *f)
{
    enum { N = 6 };
    struct moe_pager_faults faults = {.fail_nth = 3};
    struct moe_pager_stats st;
    struct tjob *t[N];
    struct result res[N];

    ASSERT_EQ(run_faulty(f, false, &faults, N, t, res, &st), 1);
    for (int i = 0; i < N; i++) {
        if (res[i].status == 0) {
            tjob_check(t[i], f);
        } else {
            ASSERT_EQ(res[i].status, -EIO);
            ASSERT_CONTAINS(res[i].msg, f->path);
            ASSERT_CONTAINS(res[i].msg, "offset");
            ASSERT_CONTAINS(res[i].msg, strerror(EIO));
        }
        tjob_destroy(t[i]);
    }
    /* every 5th read fails: several jobs fail, each once, the rest whole */
    faults = (struct moe_pager_faults){.fail_nth = 5, .every = true};
    for (int b = 0; b < 2; b++) {
        ASSERT_TRUE(run_faulty(f, b, &faults, N, t, res, &st) >= 2);
        for (int i = 0; i < N; i++) {
            if (res[i].status == 0)
                tjob_check(t[i], f);
            else
                ASSERT_EQ(res[i].status, -EIO);
            tjob_destroy(t[i]);
        }
    }
}

/* Every 3rd read comes back short: every job is still whole. */
static void test_short(struct tfile *f)
{
    enum { N = 8 };
    struct moe_pager_faults faults = {.short_nth = 3, .every = true};
    struct moe_pager_stats st;
    struct tjob *t[N];
    struct result res[N];

    for (int b = 0; b < 2; b++) {
        ASSERT_EQ(run_faulty(f, b, &faults, N, t, res, &st), 0);
        for (int i = 0; i < N; i++) {
            tjob_check(t[i], f);
            tjob_destroy(t[i]);
        }
        ASSERT_TRUE(st.short_reads > 0);
        ASSERT_EQ(st.reads, N * 4 + st.short_reads);
        ASSERT_EQ(st.bytes_read, N * (256 << 10));
    }
}

/* The 2nd read gets one byte flipped: exactly one byte differs. */
static void test_corrupt(struct tfile *f)
{
    struct moe_pager_faults faults = {.corrupt_nth = 2};
    struct moe_pager_stats st;
    struct tjob *t[1];
    struct result res[1];
    const uint8_t *b;
    int diffs = 0;

    ASSERT_EQ(run_faulty(f, false, &faults, 1, t, res, &st), 0);
    b = t[0]->bufs[0];
    for (size_t k = 0; k < t[0]->segs[0].len; k++) {
        if (b[k] != f->data[k]) {
            ASSERT_EQ(b[k] ^ f->data[k], 0x5a);
            diffs++;
        }
    }
    ASSERT_EQ(diffs, 1);
    tjob_destroy(t[0]);
}

/* O_DIRECT refused after open (refuse_direct): the file falls back to
 * buffered reads, says so once, and the bytes are right. */
static void test_refused_direct(struct tfile *f)
{
    struct moe_pager_config cfg = {
        .queue_depth = 8, .chunk_bytes = 64 << 10, .faults = {.refuse_direct = true}};
    struct moe_pager *p = pager_new(&cfg);
    struct moe_pager_stats st;
    atomic_int count = 0;
    struct tjob t;
    int id = add(p, f);

    ASSERT_TRUE(moe_pager_file_direct(p, id));
    moe_log_set_level(MOE_LOG_WARN);
    log_reset();
    moe_log_set_sink(log_sink, NULL);
    tjob_init(&t, &count);
    tjob_seg(&t, id, 0, 1 << 20, 1 << 20);
    tjob_seg(&t, id, 2 << 20, 1 << 20, 1 << 20);
    run1(p, &t);
    tjob_check(&t, f);
    tjob_release(&t);
    tjob_init(&t, &count);
    tjob_seg(&t, id, 4 << 20, 1 << 20, 1 << 20);
    run1(p, &t);
    tjob_check(&t, f);
    tjob_release(&t);
    moe_log_set_sink(NULL, NULL);
    ASSERT_TRUE(!moe_pager_file_direct(p, id));
    moe_pager_get_stats(p, &st);
    ASSERT_EQ(st.files_buffered, 1);
    pthread_mutex_lock(&log_lock);
    ASSERT_CONTAINS(log_text, "O_DIRECT refused by the filesystem");
    ASSERT_CONTAINS(log_text, f->path);
    /* once */
    ASSERT_TRUE(strstr(strstr(log_text, "O_DIRECT refused") + 1, "O_DIRECT refused") == NULL);
    pthread_mutex_unlock(&log_lock);
    moe_pager_free(p);
}

/* A file on tmpfs (/dev/shm): O_DIRECT or its fallback, the right bytes. */
static void test_shm(void)
{
    struct tfile f;
    char *shm;
    atomic_int count = 0;
    struct tjob t;
    struct moe_pager *p;
    struct moe_pager_stats st;
    int id;

    if (access("/dev/shm", W_OK) != 0) {
        fprintf(stderr, "note: no writable /dev/shm, tmpfs case not tested\n");
        return;
    }
    if (asprintf(&shm, "/dev/shm/moed-test-pager-%d", (int)getpid()) < 0 || mkdir(shm, 0700) < 0)
        FAIL("mkdir %s", shm);
    tfile_make(&f, shm, "tensor.bin", (1 << 20) + 777, 99);
    p = pager_new(&(struct moe_pager_config){.chunk_bytes = 128 << 10});
    id = add(p, &f);
    tjob_init(&t, &count);
    tjob_seg(&t, id, 0, (1 << 20) + AL, (1 << 20) + 777);
    run1(p, &t);
    tjob_check(&t, &f);
    tjob_release(&t);
    moe_pager_get_stats(p, &st);
    /* tmpfs takes O_DIRECT since Linux 6.6; older ones refuse it */
    ASSERT_EQ(st.files_buffered, !moe_pager_file_direct(p, id));
    moe_pager_free(p);
    tfile_free(&f);
    rmdir(shm);
    free(shm);
}

/* The file shrinks after it was added: a segment needing bytes past the new
 * end fails with "truncated", one within it as modified, and succeeds once
 * the file is refreshed. */
static void test_truncated(void)
{
    struct tfile f;
    struct moe_pager *p;
    atomic_int count = 0;
    struct tjob t;
    char want[160];
    int id;

    for (int buffered = 0; buffered < 2; buffered++) {
        tfile_make(&f, dir, "shrinks.safetensors", 1 << 20, 7);
        p = pager_new(&(struct moe_pager_config){.buffered = buffered, .chunk_bytes = 128 << 10});
        id = add(p, &f);
        ASSERT_EQ(truncate(f.path, (512 << 10) + 100), 0);
        f.size = (512 << 10) + 100;

        tjob_init(&t, &count);
        tjob_seg(&t, id, 0, 1 << 20, 1 << 20);
        run1(p, &t);
        ASSERT_EQ(t.status, -EIO);
        ASSERT_CONTAINS(t.msg, f.path);
        ASSERT_CONTAINS(t.msg, "truncated");
        snprintf(want, sizeof(want), "expected %d bytes, now %d", 1 << 20, (512 << 10) + 100);
        ASSERT_CONTAINS(t.msg, want);
        tjob_release(&t);

        /* Within the new end: the file is still not the one added. */
        tjob_init(&t, &count);
        tjob_seg(&t, id, 256 << 10, (256 << 10) + AL, (256 << 10) + 100);
        run1(p, &t);
        ASSERT_EQ(t.status, -EBADMSG);
        ASSERT_CONTAINS(t.msg, "modified since it was loaded");
        tjob_release(&t);
        /* ... until the caller takes it as it is now. */
        ASSERT_EQ(moe_pager_refresh_file(p, id), 0);
        tjob_init(&t, &count);
        tjob_seg(&t, id, 256 << 10, (256 << 10) + AL, (256 << 10) + 100);
        run1(p, &t);
        tjob_check(&t, &f);
        tjob_release(&t);
        moe_pager_free(p);
        tfile_free(&f);
    }
}

/* Issue 22, defect 4: a file modified in place after it was added (its
 * mtime, here a byte rewritten) fails every job that reads it with
 * -EBADMSG naming it, even with the bytes put back (the identity differs),
 * until the caller refreshes it; a file replaced by rename is still read
 * as added (the pager holds the old inode). */
static void test_modified(void)
{
    struct tfile f;
    struct moe_pager *p;
    atomic_int count = 0;
    struct tjob t;
    struct timespec old[2] = {{.tv_sec = 1577836800}, {.tv_sec = 1577836800}};
    uint8_t b;
    int id, fd;

    for (int buffered = 0; buffered < 2; buffered++) {
        tfile_make(&f, dir, "modified.safetensors", 1 << 20, 9);
        ASSERT_EQ(utimensat(AT_FDCWD, f.path, old, 0), 0);
        p = pager_new(&(struct moe_pager_config){.buffered = buffered, .chunk_bytes = 128 << 10});
        id = add(p, &f);
        tjob_init(&t, &count);
        tjob_seg(&t, id, 0, 256 << 10, 256 << 10);
        run1(p, &t);
        tjob_check(&t, &f);
        tjob_release(&t);

        fd = open(f.path, O_WRONLY | O_CLOEXEC);
        ASSERT_TRUE(fd >= 0);
        b = f.data[(512 << 10) + 5] ^ 0xff;
        ASSERT_EQ(pwrite(fd, &b, 1, (512 << 10) + 5), 1);
        for (int k = 0; k < 2; k++) { /* the byte changed, then put back */
            tjob_init(&t, &count);
            tjob_seg(&t, id, 0, 256 << 10, 256 << 10); /* not even the bytes changed */
            run1(p, &t);
            ASSERT_EQ(t.status, -EBADMSG);
            ASSERT_CONTAINS(t.msg, f.path);
            ASSERT_CONTAINS(t.msg, "modified since it was loaded");
            tjob_release(&t);
            ASSERT_EQ(pwrite(fd, &f.data[(512 << 10) + 5], 1, (512 << 10) + 5), 1);
        }
        close(fd);
        ASSERT_EQ(moe_pager_refresh_file(p, id), 0);
        ASSERT_EQ(moe_pager_refresh_file(p, id + 1), -ENOENT);
        tjob_init(&t, &count);
        tjob_seg(&t, id, 0, 1 << 20, 1 << 20);
        run1(p, &t);
        tjob_check(&t, &f);
        tjob_release(&t);

        /* Replaced by rename: the pager's fd still reads the file added. */
        {
            struct tfile g;

            tfile_make(&g, dir, "replacement", 1 << 20, 10);
            ASSERT_EQ(rename(g.path, f.path), 0);
            tjob_init(&t, &count);
            tjob_seg(&t, id, 0, 1 << 20, 1 << 20);
            run1(p, &t);
            tjob_check(&t, &f);
            tjob_release(&t);
            free(g.path);
            free(g.data);
        }
        moe_pager_free(p);
        tfile_free(&f);
    }
}

static atomic_int bad_calls;

static void bad_done(struct moe_pager_job *j, int status, const char *msg)
{
    (void)j;
    (void)status;
    (void)msg;
    atomic_fetch_add(&bad_calls, 1);
}

/* Malformed jobs: -EINVAL with a message, done never called. */
static void test_bad_calls(struct tfile *f)
{
    struct moe_pager *p = pager_new(NULL);
    uint8_t *buf = xalloc(4 * AL);
    int id = add(p, f);
    struct moe_error err;
    static const struct {
        const char *what;
        int file;
        uint64_t off, len, need, dst_off;
    } cases[] = {
        {"file id -1", -1, 0, AL, AL, 0},
        {"file id past the last", 1, 0, AL, AL, 0},
        {"file id far away", 1000000, 0, AL, AL, 0},
        {"misaligned offset", 0, 100, AL, AL, 0},
        {"misaligned length", 0, 0, AL + 1, AL, 0},
        {"misaligned dst", 0, 0, AL, AL, 8},
        {"need > len", 0, 0, AL, AL + 1, 0},
        {"offset + len overflows", 0, UINT64_MAX - AL + 1, 2 * AL, AL, 0},
    };

    for (size_t i = 0; i < MOE_ARRAY_SIZE(cases); i++) {
        struct moe_pager_seg segs[2] = {
            {id, 0, AL, AL, buf},
            {cases[i].file == 0 ? id : cases[i].file, cases[i].off, cases[i].len, cases[i].need,
             buf + cases[i].dst_off},
        };
        struct moe_pager_job job = {.segs = segs, .n_segs = 2, .done = bad_done};

        memset(&err, 0, sizeof(err));
        if (moe_pager_submit(p, &job, &err) != -EINVAL)
            FAIL("%s: not refused", cases[i].what);
        ASSERT_EQ(err.code, -EINVAL);
        ASSERT_CONTAINS(err.msg, "segment 1");
    }
    {
        struct moe_pager_seg seg = {id, 0, AL, AL, buf};
        struct moe_pager_job nodone = {.segs = &seg, .n_segs = 1};
        struct moe_pager_job nosegs = {.n_segs = 1, .done = bad_done};
        struct moe_pager_job negative = {.segs = &seg, .n_segs = -1, .done = bad_done};

        ASSERT_EQ(moe_pager_submit(p, &nodone, &err), -EINVAL);
        ASSERT_EQ(moe_pager_submit(p, &nosegs, &err), -EINVAL);
        ASSERT_EQ(moe_pager_submit(p, &negative, &err), -EINVAL);
    }
    /* files: missing, a directory */
    ASSERT_EQ(moe_pager_add_file(p, "/nonexistent/moed-pager-test", 1, &id, &err), -ENOENT);
    ASSERT_CONTAINS(err.msg, "/nonexistent/moed-pager-test");
    ASSERT_EQ(moe_pager_add_file(p, dir, 1, &id, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "not a regular file");
    ASSERT_EQ(moe_pager_file_direct(p, 5), false);
    ASSERT_EQ(moe_pager_file_direct(p, -1), false);
    moe_pager_free(p);
    ASSERT_EQ(atomic_load(&bad_calls), 0);
    free(buf);

    /* bad configurations */
    {
        static const struct moe_pager_config bad[] = {
            {.n_threads = -1},        {.n_threads = 1000},   {.queue_depth = -2},
            {.queue_depth = 1 << 20}, {.chunk_bytes = 1000}, {.chunk_bytes = (size_t)1 << 40},
            {.n_regions = 2},
        };

        for (size_t i = 0; i < MOE_ARRAY_SIZE(bad); i++) {
            memset(&err, 0, sizeof(err));
            p = NULL;
            ASSERT_EQ(moe_pager_create(&bad[i], &p, &err), -EINVAL);
            ASSERT_TRUE(p == NULL);
            ASSERT_CONTAINS(err.msg, "pager: ");
        }
    }
    moe_pager_free(NULL);
}

/* Freeing with jobs queued and in flight: each done runs once, first. */
static void test_free_in_flight(struct tfile *f)
{
    enum { N = 24 };
    struct tjob *t = calloc(N, sizeof(*t));
    atomic_int count = 0;
    struct moe_pager *p =
        pager_new(&(struct moe_pager_config){.n_threads = 2, .chunk_bytes = 256 << 10});
    int id = add(p, f);

    ASSERT_TRUE(t != NULL);
    for (int i = 0; i < N; i++) {
        tjob_init(&t[i], &count);
        tjob_seg(&t[i], id, (uint64_t)(i % 4) * (2 << 20), 2 << 20, 2 << 20);
        submit(p, &t[i]);
    }
    moe_pager_free(p);
    ASSERT_EQ(atomic_load(&count), N);
    for (int i = 0; i < N; i++) {
        tjob_check(&t[i], f);
        tjob_release(&t[i]);
    }
    free(t);
}

/* A done callback that submits the next job (a chain of page-ins). */
struct chain {
    struct tjob t;
    struct moe_pager *p;
    int left;
};

static void chain_done(struct moe_pager_job *j, int status, const char *msg)
{
    struct chain *c = j->arg;
    struct moe_error err;

    ASSERT_EQ(status, 0);
    (void)msg;
    if (--c->left > 0) {
        c->t.segs[0].offset = (uint64_t)c->left * AL * 16;
        ASSERT_EQ(moe_pager_submit(c->p, &c->t.job, &err), 0);
        return;
    }
    j->arg = &c->t;
    tjob_done(j, status, msg);
}

static void test_done_submits(struct tfile *f)
{
    struct chain c;
    atomic_int count = 0;

    c.p = pager_new(&(struct moe_pager_config){.n_threads = 2});
    c.left = 50;
    tjob_init(&c.t, &count);
    tjob_seg(&c.t, add(c.p, f), (uint64_t)c.left * AL * 16, 16 * AL, 16 * AL);
    c.t.job.done = chain_done;
    c.t.job.arg = &c;
    submit(c.p, &c.t);
    /* free waits for the whole chain, resubmits included */
    moe_pager_free(c.p);
    ASSERT_EQ(atomic_load(&count), 1);
    ASSERT_EQ(c.left, 0);
    tjob_check(&c.t, f);
    tjob_release(&c.t);
}

static double cpu_secs(void)
{
    struct rusage ru;

    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6;
}

/* An idle pager sleeps: its threads burn no CPU between jobs. */
/* References of this process to path: descriptors, and entries of the
 * io_uring file tables (each ring's fdinfo lists its registered files). */
static int refs_to(const char *name)
{
    DIR *d = opendir("/proc/self/fd");
    char path[PATH_MAX];
    struct dirent *de;
    int n = 0;

    /* The links are absolute; the test's directory may be relative. */
    ASSERT_TRUE(realpath(name, path) != NULL);
    ASSERT_TRUE(d != NULL);
    while ((de = readdir(d))) {
        char link[PATH_MAX], target[PATH_MAX], info[PATH_MAX + 64], line[PATH_MAX + 64];
        ssize_t len;
        FILE *fi;

        if (de->d_name[0] == '.')
            continue;
        snprintf(link, sizeof(link), "/proc/self/fd/%s", de->d_name);
        len = readlink(link, target, sizeof(target) - 1);
        if (len < 0)
            continue;
        target[len] = 0;
        if (strcmp(target, path) == 0) {
            n++;
            continue;
        }
        if (!strstr(target, "io_uring"))
            continue;
        snprintf(info, sizeof(info), "/proc/self/fdinfo/%s", de->d_name);
        fi = fopen(info, "re");
        if (!fi)
            continue;
        while (fgets(line, sizeof(line), fi)) {
            char *at = strstr(line, path);

            /* "  3: PATH\n": the whole path, not a longer one */
            if (at && (at[strlen(path)] == '\n' || at[strlen(path)] == 0))
                n++;
        }
        fclose(fi);
    }
    closedir(d);
    return n;
}

/* Removed files: their descriptors closed and ring slots emptied, their ids
 * given to the next file added, jobs naming them refused; a model loaded
 * and unloaded again and again used to leave one descriptor per load. */
static void test_remove_file(struct tfile *f)
{
    static const struct moe_pager_config cfgs[] = {{0}, {.buffered = true}, {.no_register = true}};
    struct moe_error err = {0};
    struct tfile g;

    tfile_make(&g, dir, "model-00002-of-00002.safetensors", 64 << 10, 7);
    for (size_t c = 0; c < MOE_ARRAY_SIZE(cfgs); c++) {
        struct moe_pager *p = pager_new(&cfgs[c]);
        int before = refs_to(f->path), other = add(p, &g), first = -1;
        atomic_int count = 0;

        for (int i = 0; i < 10; i++) {
            struct tjob t;
            int id = add(p, f);

            if (i == 0)
                first = id;
            /* The id a removed file left is the one given next. */
            ASSERT_EQ(id, first);
            ASSERT_TRUE(refs_to(f->path) > before);
            tjob_init(&t, &count);
            tjob_seg(&t, id, (uint64_t)i * AL, 4 * AL, 4 * AL);
            run1(p, &t);
            tjob_check(&t, f);
            tjob_release(&t);
            ASSERT_EQ(moe_pager_remove_file(p, id), 0);
            ASSERT_EQ(refs_to(f->path), before);
        }
        /* Gone: removed twice, read, asked about. */
        ASSERT_EQ(moe_pager_remove_file(p, first), -ENOENT);
        ASSERT_EQ(moe_pager_remove_file(p, -1), -ENOENT);
        ASSERT_EQ(moe_pager_remove_file(p, MOE_PAGER_MAX_FILES), -ENOENT);
        ASSERT_EQ(moe_pager_file_direct(p, first), false);
        {
            struct moe_pager_seg seg = {first, 0, AL, AL, NULL};
            struct moe_pager_job job = {.segs = &seg, .n_segs = 1, .done = tjob_done};

            seg.dst = xalloc(AL);
            ASSERT_EQ(moe_pager_submit(p, &job, &err), -EINVAL);
            ASSERT_CONTAINS(err.msg, "no file");
            free(seg.dst);
        }
        /* The other file still reads. */
        {
            struct tjob t;

            tjob_init(&t, &count);
            tjob_seg(&t, other, 0, 2 * AL, 2 * AL);
            run1(p, &t);
            tjob_check(&t, &g);
            tjob_release(&t);
        }
        moe_pager_free(p);
        ASSERT_EQ(refs_to(g.path), 0);
    }
    ASSERT_EQ(moe_pager_remove_file(NULL, 0), 0);
    tfile_free(&g);
}

static void test_idle(struct tfile *f)
{
    struct moe_pager *p = pager_new(&(struct moe_pager_config){.n_threads = 4});
    atomic_int count = 0;
    struct tjob t;
    double c0;

    tjob_init(&t, &count);
    tjob_seg(&t, add(p, f), 0, AL, AL);
    run1(p, &t);
    tjob_release(&t);
    c0 = cpu_secs();
    usleep(300 * 1000);
    /* spinning would be about 4 x 0.3 s on the pager's threads */
    if (cpu_secs() - c0 > 0.1)
        FAIL("idle pager used %.3f s of CPU in 0.3 s", cpu_secs() - c0);
    moe_pager_free(p);
}

/* io_uring refused (io_uring_disabled, seccomp): create fails and says why.
 * Run in a child under a seccomp filter that fails io_uring_setup. */
static void test_no_io_uring(void)
{
    static const int errs[] = {ENOSYS, EPERM};

    for (size_t i = 0; i < MOE_ARRAY_SIZE(errs); i++) {
        pid_t pid = fork();
        int wst;

        ASSERT_TRUE(pid >= 0);
        if (pid == 0) {
            struct sock_filter filt[] = {
                BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
                BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
                BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (unsigned)errs[i]),
                BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
            };
            struct sock_fprog prog = {(unsigned short)MOE_ARRAY_SIZE(filt), filt};
            struct moe_error err = {0};
            struct moe_pager *p = NULL;
            int r;

            if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
                prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) < 0)
                _exit(TEST_SKIP);
            r = moe_pager_create(&(struct moe_pager_config){.n_threads = 2}, &p, &err);
            if (r != -errs[i] || p != NULL || !strstr(err.msg, "io_uring is not available")) {
                fprintf(stderr, "create under seccomp: %d (%s)\n", r, err.msg);
                _exit(1);
            }
            _exit(0);
        }
        ASSERT_EQ(waitpid(pid, &wst, 0), pid);
        ASSERT_TRUE(WIFEXITED(wst));
        if (WEXITSTATUS(wst) == TEST_SKIP) {
            fprintf(stderr, "note: no seccomp filters here, io_uring refusal not tested\n");
            return;
        }
        ASSERT_EQ(WEXITSTATUS(wst), 0);
    }
}

int main(void)
{
    struct tfile f;
    struct statfs sfs;
    char *tmp;

    alarm(120);
    tmp = test_tmpdir("pager");
    dir = tmp;
    if (statfs(tmp, &sfs) == 0 && sfs.f_type == TMPFS_MAGIC)
        fprintf(stderr, "note: %s is on tmpfs\n", tmp);
    if (!direct_works(tmp)) {
        /* $TMPDIR without O_DIRECT: use the build tree, on disk */
        char cwd_tmp[] = "./moed-pager-XXXXXX";

        fprintf(stderr, "note: no O_DIRECT in %s, using the current directory\n", tmp);
        test_rmtree(tmp);
        free(tmp);
        if (!mkdtemp(cwd_tmp))
            FAIL("mkdtemp");
        tmp = strdup(cwd_tmp);
        dir = tmp;
        if (!direct_works(tmp)) {
            fprintf(stderr, "skip: O_DIRECT works in neither $TMPDIR nor here\n");
            test_rmtree(tmp);
            return TEST_SKIP;
        }
    }
    tfile_make(&f, dir, "model-00001-of-00002.safetensors", FILE_SIZE, 42);

    test_basic(&f, false, true);
    test_basic(&f, true, false);
    test_big_jobs(&f);
    test_urgent(&f);
    test_past_eof(&f, false);
    test_past_eof(&f, true);
    test_concurrent(&f);
    test_regions(&f, false);
    test_regions(&f, true);
    test_big_region(&f);
    test_fail_nth(&f);
    test_short(&f);
    test_corrupt(&f);
    test_refused_direct(&f);
    test_shm();
    test_truncated();
    test_modified();
    test_bad_calls(&f);
    test_free_in_flight(&f);
    test_done_submits(&f);
    test_remove_file(&f);
    test_idle(&f);
    test_no_io_uring();

    tfile_free(&f);
    test_rmtree(tmp);
    free(tmp);
    return 0;
}
