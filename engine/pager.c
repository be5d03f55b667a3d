/*
 * The pager (see pager.h): reads byte ranges of model files with io_uring.
 *
 * What it owns:
 *   struct moe_pager  the configuration, the file table, the workers, the
 *                     registered-buffer map, the count of jobs not yet done
 *                     (moe_pager_free waits on it), fault settings, stats.
 *   struct pfile      one file: its O_DIRECT fd (fixed once added), its slot
 *                     in every ring's registered file table, and its
 *                     buffered fd (opened when O_DIRECT is refused), and
 *                     its identity (device, inode, size, mtime) as added:
 *                     a job whose file no longer has it fails (-EBADMSG)
 *                     when its reads are done, so that a checkpoint
 *                     modified in place is never served as loaded.  Its
 *                     id is its index in files[] and its ring slot; a
 *                     removed file leaves its id free for the next added.
 *   struct worker     one pager thread and its ring.  Jobs come in on the
 *                     worker's queue; everything else of the worker (the
 *                     pending list, the job being cut into chunks, the read
 *                     slots) is private to its thread.
 *   struct rd         one read in flight: a chunk of a segment, the bytes of
 *                     it that have arrived, and the request now in the ring.
 *
 * A job belongs to one worker from moe_pager_submit to its done callback.
 * Its private fields (pager.h) are written by the submitter before the job
 * is queued (published by the worker's lock) and afterwards only by that
 * worker's thread:
 *   next_                 link in the queue or the pending list;
 *   next_seg_, next_off_  the chunking cursor; next_seg_ == n_segs once
 *                         every chunk is issued or the job has failed;
 *   chunks_left_          reads of the job in flight;
 *   status_, msg_         the first failure.
 * Invariant: done runs exactly once, when next_seg_ == n_segs and
 * chunks_left_ == 0, so no read of the job is in flight when it runs.
 *
 * Wakeup: each worker keeps a read of its eventfd in its ring.  Submit
 * writes the eventfd when it puts a job on an empty queue, so an idle
 * worker sleeps in io_uring_submit_and_wait and a busy one sees at most one
 * extra completion.  The worker empties the whole queue each time round.
 *
 * Locks: pager.lock (n_jobs, stopped; `idle` waits on it), pager.files_lock
 * (serialises moe_pager_add_file and _remove_file), worker.lock (queue, stop), pfile.lock
 * (the switch to buffered reads).  No lock is held while another is taken,
 * and none while a done callback runs.
 */
#include "pager.h"

#include "log.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <liburing.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#define DEF_DEPTH 32
#define DEF_CHUNK ((size_t)1 << 20)
#define MAX_THREADS 64
#define MAX_DEPTH 4096
#define MAX_CHUNK ((size_t)256 << 20)
#define REG_PIECE_MAX ((uint64_t)1 << 30) /* the kernel's limit per registered buffer */
#define REG_BUFS_MAX 16384                /* IORING_MAX_REG_BUFFERS */
#define CQE_BATCH 64
#define ALIGN_MASK ((uint64_t)MOE_PAGER_ALIGN - 1)

enum {
    HIT_FAIL = 1,
    HIT_SHORT = 2,
    HIT_CORRUPT = 4,
};

struct pfile {
    char *path;
    uint64_t expected_size; /* as the caller loaded it */
    int dfd;                /* O_DIRECT fd, -1 when none; fixed once added */
    int slot;               /* index in every ring's file table, -1: not registered */
    pthread_mutex_t lock;   /* guards the switch to buffered reads */
    int bfd;            /* buffered fd, -1 until needed; set under lock, before direct is cleared */
    atomic_bool direct; /* reads go to dfd */
    atomic_bool direct_ok; /* an O_DIRECT read has succeeded: EINVAL is a real error */
    /* Its identity when added or refreshed (moe_pager_refresh_file); guarded
     * by lock.  size is the caller's expected_size when it gave one. */
    dev_t dev;
    ino_t ino;
    uint64_t size;
    struct timespec mtime;
};

/* A registered buffer: [start, end), registered at its index in the array. */
struct reg_piece {
    uintptr_t start, end;
};

struct rd {
    struct moe_pager_job *job;
    const struct moe_pager_seg *seg;
    struct pfile *f;
    uint64_t pos;     /* file bytes from the chunk's start to pos have arrived */
    uint64_t end;     /* file offset of the chunk's end */
    uint64_t req_off; /* the read in the ring: its file offset, */
    uint32_t req_len; /* its length, */
    bool req_direct;  /* and whether it went to the O_DIRECT fd */
    struct rd *next_free;
};

struct worker {
    struct moe_pager *p;
    int idx;
    pthread_t thread;
    bool thread_started;
    struct io_uring ring;
    bool ring_ok;     /* ring initialised */
    int efd;          /* eventfd that wakes the thread */
    uint64_t efd_val; /* target of the eventfd read in the ring */

    pthread_mutex_t lock;
    struct moe_pager_job *qhead, *qtail; /* submitted jobs; guarded by lock */
    bool stop;                           /* guarded by lock */

    /* Jobs queued here or running, not yet done.  Relaxed: only a hint for
     * picking the least loaded worker. */
    atomic_int load;

    /* Private to the thread. */
    struct moe_pager_job *pending_head, *pending_tail; /* taken from the queue, not started
                                                        * (or parked) */
    struct moe_pager_job *urgent_head, *urgent_tail;   /* the same, urgent ones */
    struct moe_pager_job *cur;                         /* being cut into chunks */
    struct rd *rds;                                    /* queue_depth slots */
    struct rd *free_rds;
    int inflight;   /* slots in use */
    bool efd_armed; /* the eventfd read is in the ring */
};

struct moe_pager {
    int n_threads, depth;
    size_t chunk;
    bool buffered, no_register;

    struct worker *workers;
    atomic_uint rr; /* relaxed: spreads ties between workers */

    struct reg_piece *pieces; /* sorted by start; registered with every ring */
    int n_pieces;
    bool bufs_registered;
    bool files_registered; /* every ring has a sparse table of file_slots */
    unsigned file_slots;

    pthread_mutex_t files_lock; /* serialises moe_pager_add_file and _remove_file */
    /* NULL where no file is (never added, or removed).  Release in add_file
     * and remove_file; pairs with the acquire loads in check_job() and
     * moe_pager_file_direct(). */
    _Atomic(struct pfile *) files[MOE_PAGER_MAX_FILES];
    /* One past the highest id ever given out; written under files_lock.
     * Release in add_file after files[id] is written; pairs with the same
     * acquire loads. */
    atomic_int n_files;

    pthread_mutex_t lock;
    pthread_cond_t idle; /* n_jobs became 0 */
    uint64_t n_jobs;     /* submitted, done not yet returned; guarded by lock */
    bool stopped;        /* no more submits; guarded by lock */

    /* Fault injection.  Relaxed: test knobs, no ordering with the reads. */
    struct {
        atomic_uint_fast64_t fail_nth, short_nth, corrupt_nth, count;
        atomic_bool every, refuse_direct;
    } faults;

    /* Counters.  Relaxed: monotonic statistics, read without ordering. */
    struct {
        atomic_uint_fast64_t jobs_done, jobs_failed, reads, short_reads, bytes_read, files_buffered;
    } st;
};

static inline void stat_add(atomic_uint_fast64_t *c, uint64_t v)
{
    atomic_fetch_add_explicit(c, v, memory_order_relaxed);
}

static inline uint64_t rd_load(atomic_uint_fast64_t *c)
{
    return atomic_load_explicit(c, memory_order_relaxed);
}

/* ---- jobs ---- */

static bool job_issued(const struct moe_pager_job *j)
{
    return j->next_seg_ >= (uint64_t)j->n_segs;
}

/* Moves the cursor past empty segments. */
static void job_skip_empty(struct moe_pager_job *j)
{
    while (!job_issued(j) && j->next_off_ >= j->segs[j->next_seg_].len) {
        j->next_seg_++;
        j->next_off_ = 0;
    }
}

/* Records the job's first failure and stops issuing its chunks. */
static void job_fail(struct moe_pager_job *j, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void job_fail(struct moe_pager_job *j, int code, const char *fmt, ...)
{
    va_list ap;

    if (j->status_ == 0) {
        j->status_ = code;
        va_start(ap, fmt);
        vsnprintf(j->msg_, sizeof(j->msg_), fmt, ap);
        va_end(ap);
    }
    j->next_seg_ = (uint64_t)j->n_segs;
    j->next_off_ = 0;
}

/* Records the identity of the file open as fd in f (lock held or f not yet
 * published); 0 or -errno. */
static int file_ident(struct pfile *f, int fd, uint64_t expected_size)
{
    struct stat st;

    if (fstat(fd, &st) < 0)
        return -errno;
    f->dev = st.st_dev;
    f->ino = st.st_ino;
    f->size = expected_size ? expected_size : (uint64_t)st.st_size;
    f->mtime = st.st_mtim;
    return 0;
}

/* Whether st is the identity recorded in f (lock held). */
static bool ident_same(const struct pfile *f, const struct stat *st)
{
    return st->st_dev == f->dev && st->st_ino == f->ino && (uint64_t)st->st_size == f->size &&
           st->st_mtim.tv_sec == f->mtime.tv_sec && st->st_mtim.tv_nsec == f->mtime.tv_nsec;
}

/*
 * Whether every file of j still has the identity it had when added: one
 * fstat per file, on the fd the pager reads (a file replaced by rename
 * keeps the old inode open, which still reads as loaded).  Fails j with
 * -EBADMSG naming the file and what changed, so that a file modified
 * before or during the reads is never served.
 */
static void job_check_files(struct moe_pager *p, struct moe_pager_job *j)
{
    for (int i = 0; i < j->n_segs && !j->status_; i++) {
        /* Relaxed: as in job_next_chunk(). */
        struct pfile *f = atomic_load_explicit(&p->files[j->segs[i].file], memory_order_relaxed);
        struct stat st;
        bool same;

        if (i > 0 && j->segs[i - 1].file == j->segs[i].file)
            continue;
        if (fstat(f->dfd >= 0 ? f->dfd : f->bfd, &st) < 0) {
            job_fail(j, -errno, "%s: cannot stat: %s", f->path, strerror(errno));
            return;
        }
        pthread_mutex_lock(&f->lock);
        same = ident_same(f, &st);
        if (!same)
            job_fail(j, -EBADMSG,
                     "%s: file modified since it was loaded (size %" PRIu64 " -> %" PRIu64
                     ", mtime %lld.%09ld -> %lld.%09ld): restore it and retry, or reload the model",
                     f->path, f->size, (uint64_t)st.st_size, (long long)f->mtime.tv_sec,
                     f->mtime.tv_nsec, (long long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
        pthread_mutex_unlock(&f->lock);
    }
}

/* Calls done; the job is not referenced by the worker afterwards. */
static void job_finish(struct worker *w, struct moe_pager_job *j)
{
    struct moe_pager *p = w->p;
    int status;

    assert(job_issued(j) && j->chunks_left_ == 0);
    if (!j->status_)
        job_check_files(p, j);
    status = j->status_;
    if (w->cur == j)
        w->cur = NULL;
    stat_add(status ? &p->st.jobs_failed : &p->st.jobs_done, 1);
    atomic_fetch_sub_explicit(&w->load, 1, memory_order_relaxed);
    if (status && !j->msg_[0])
        snprintf(j->msg_, sizeof(j->msg_), "page-in failed: %s", strerror(-status));
    j->done(j, status, j->msg_);
    /* The job may be gone now. */
    pthread_mutex_lock(&p->lock);
    if (--p->n_jobs == 0)
        pthread_cond_broadcast(&p->idle);
    pthread_mutex_unlock(&p->lock);
}

/* ---- reads ---- */

static struct io_uring_sqe *get_sqe(struct worker *w)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&w->ring);

    if (!sqe) {
        /* Cannot happen: the SQ has room for every slot and the eventfd
         * read, each of which has at most one request prepared. */
        io_uring_submit(&w->ring);
        sqe = io_uring_get_sqe(&w->ring);
    }
    assert(sqe);
    return sqe;
}

/* The registered buffer that holds [dst, dst + len), or -1. */
static int reg_lookup(const struct moe_pager *p, const void *dst, uint64_t len)
{
    uintptr_t a = (uintptr_t)dst;
    int lo = 0, hi = p->n_pieces - 1, found = -1;

    if (!p->bufs_registered)
        return -1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;

        if (p->pieces[mid].start <= a) {
            found = mid;
            lo = mid + 1;
        } else {
            hi = mid - 1;
        }
    }
    if (found < 0 || a + len > p->pieces[found].end)
        return -1;
    return found;
}

static uint8_t *rd_dst(const struct rd *r, uint64_t off)
{
    return (uint8_t *)r->seg->dst + (off - r->seg->offset);
}

/* Puts the read of [pos, end) of r in the ring: for an O_DIRECT file the
 * start moves down to the alignment (dst and offset are congruent modulo
 * MOE_PAGER_ALIGN, so both become aligned) and the few bytes are read again. */
static void rd_issue(struct worker *w, struct rd *r)
{
    struct pfile *f = r->f;
    /* Acquire: pairs with the release in file_fallback(); bfd is set. */
    bool direct = atomic_load_explicit(&f->direct, memory_order_acquire);
    uint64_t off = direct ? r->pos & ~ALIGN_MASK : r->pos;
    uint32_t len = (uint32_t)(r->end - off);
    uint8_t *dst = rd_dst(r, off);
    struct io_uring_sqe *sqe = get_sqe(w);
    bool fixed = direct && f->slot >= 0;
    int fd = fixed ? f->slot : direct ? f->dfd : f->bfd;
    int bi = reg_lookup(w->p, dst, len);

    if (bi >= 0)
        io_uring_prep_read_fixed(sqe, fd, dst, len, off, bi);
    else
        io_uring_prep_read(sqe, fd, dst, len, off);
    if (fixed)
        io_uring_sqe_set_flags(sqe, IOSQE_FIXED_FILE);
    io_uring_sqe_set_data(sqe, r);
    r->req_off = off;
    r->req_len = len;
    r->req_direct = direct;
}

/* Returns the slot; finishes its job when that was its last read. */
static void rd_release(struct worker *w, struct rd *r)
{
    struct moe_pager_job *j = r->job;

    r->job = NULL;
    r->next_free = w->free_rds;
    w->free_rds = r;
    w->inflight--;
    /* A parked job is finished when it is taken up again. */
    if (--j->chunks_left_ == 0 && job_issued(j) && !j->parked_)
        job_finish(w, j);
}

/* Issues the next chunk of j; false when every chunk is issued. */
static bool job_next_chunk(struct worker *w, struct moe_pager_job *j)
{
    const struct moe_pager_seg *s;
    struct rd *r;
    uint64_t n;

    job_skip_empty(j);
    if (job_issued(j))
        return false;
    s = &j->segs[j->next_seg_];
    n = MOE_MIN((uint64_t)w->p->chunk, s->len - j->next_off_);
    r = w->free_rds;
    assert(r);
    w->free_rds = r->next_free;
    w->inflight++;
    r->job = j;
    r->seg = s;
    /* Relaxed: check_job() saw the file with acquire before the job was
     * queued, and the caller keeps it until the job is done. */
    r->f = atomic_load_explicit(&w->p->files[s->file], memory_order_relaxed);
    r->pos = s->offset + j->next_off_;
    r->end = r->pos + n;
    j->chunks_left_++;
    j->next_off_ += n;
    job_skip_empty(j);
    rd_issue(w, r);
    return true;
}

/* Switches f to buffered reads (once); 0 or -errno from open. */
static int file_fallback(struct moe_pager *p, struct pfile *f, int why)
{
    int r = 0;

    pthread_mutex_lock(&f->lock);
    if (atomic_load_explicit(&f->direct, memory_order_relaxed)) {
        int fd = open(f->path, O_RDONLY | O_CLOEXEC);

        if (fd < 0) {
            r = -errno;
        } else {
            f->bfd = fd;
            /* Release: publishes bfd; pairs with the acquire in rd_issue()
             * and moe_pager_file_direct(). */
            atomic_store_explicit(&f->direct, false, memory_order_release);
            stat_add(&p->st.files_buffered, 1);
            moe_log(MOE_LOG_WARN,
                    "pager: %s: O_DIRECT refused by the filesystem (read: %s), reading through "
                    "the page cache",
                    f->path, strerror(-why));
        }
    }
    pthread_mutex_unlock(&f->lock);
    return r;
}

/* Which faults hit this read completion (a HIT_* mask); *ret_n: its number. */
static unsigned fault_hits(struct moe_pager *p, uint64_t *ret_n)
{
    uint64_t n = atomic_fetch_add_explicit(&p->faults.count, 1, memory_order_relaxed) + 1;
    bool every = atomic_load_explicit(&p->faults.every, memory_order_relaxed);
    uint64_t fail = atomic_load_explicit(&p->faults.fail_nth, memory_order_relaxed);
    uint64_t shrt = atomic_load_explicit(&p->faults.short_nth, memory_order_relaxed);
    uint64_t corrupt = atomic_load_explicit(&p->faults.corrupt_nth, memory_order_relaxed);
    unsigned hit = 0;

#define FAULT_HIT(nth) ((nth) && (every ? n % (nth) == 0 : n == (nth)))
    if (FAULT_HIT(fail))
        hit |= HIT_FAIL;
    if (FAULT_HIT(shrt))
        hit |= HIT_SHORT;
    if (FAULT_HIT(corrupt))
        hit |= HIT_CORRUPT;
#undef FAULT_HIT
    *ret_n = n;
    return hit;
}

static void on_read(struct worker *w, struct rd *r, int res)
{
    struct moe_pager *p = w->p;
    struct moe_pager_job *j = r->job;
    struct pfile *f = r->f;
    const struct moe_pager_seg *s = r->seg;
    uint64_t n, newpos, need_end;
    unsigned hit = fault_hits(p, &n);
    struct stat st;

    stat_add(&p->st.reads, 1);
    if (res >= 0 && r->req_direct &&
        atomic_load_explicit(&p->faults.refuse_direct, memory_order_relaxed) &&
        !atomic_load_explicit(&f->direct_ok, memory_order_relaxed))
        res = -EINVAL;
    if (res >= 0 && (hit & HIT_FAIL))
        res = -EIO;
    /* EINVAL before any O_DIRECT read of the file has worked: the
     * filesystem refuses O_DIRECT; switch to buffered and read again.
     * Relaxed direct_ok: it orders nothing, it only tells that case from
     * a real EINVAL later on. */
    if (res == -EINVAL && r->req_direct &&
        !atomic_load_explicit(&f->direct_ok, memory_order_relaxed) && !j->status_) {
        int e = file_fallback(p, f, res);

        if (e == 0) {
            rd_issue(w, r);
            return;
        }
        job_fail(j, e, "%s: cannot reopen without O_DIRECT: %s", f->path, strerror(-e));
        rd_release(w, r);
        return;
    }
    if (res < 0) {
        job_fail(j, res, "%s: cannot read %" PRIu32 " bytes at offset %" PRIu64 ": %s", f->path,
                 r->req_len, r->req_off, strerror(-res));
        rd_release(w, r);
        return;
    }
    if (r->req_direct)
        atomic_store_explicit(&f->direct_ok, true, memory_order_relaxed);
    if ((hit & HIT_SHORT) && r->req_len > MOE_PAGER_ALIGN)
        res = (int)MOE_MIN((uint32_t)res, (r->req_len / 2) & ~(uint32_t)ALIGN_MASK);
    /* Where the byte flips moves with the read's number, as a transient
     * fault would: the same chunk read again is wrong elsewhere, or whole. */
    if ((hit & HIT_CORRUPT) && res > 0)
        rd_dst(r, r->req_off)[(n * 2654435761u) % (uint64_t)res] ^= 0x5a;
    stat_add(&p->st.bytes_read, (uint64_t)res);
    if (j->status_) {
        /* The job failed elsewhere: drain. */
        rd_release(w, r);
        return;
    }
    newpos = r->req_off + (uint64_t)res;
    if (newpos >= r->end) {
        rd_release(w, r);
        return;
    }
    if (newpos > r->pos) {
        /* Short: read the rest. */
        r->pos = newpos;
        stat_add(&p->st.short_reads, 1);
        rd_issue(w, r);
        return;
    }
    /* No progress: the file ends at pos. */
    need_end = s->offset + s->need;
    if (r->pos >= need_end) {
        memset(rd_dst(r, r->pos), 0, r->end - r->pos);
        rd_release(w, r);
        return;
    }
    if (fstat(f->dfd >= 0 ? f->dfd : f->bfd, &st) < 0)
        st.st_size = (off_t)r->pos;
    job_fail(j, -EIO,
             "%s: file truncated since it was loaded: expected %" PRIu64 " bytes, now %" PRIu64
             " (reading %" PRIu32 " bytes at offset %" PRIu64 ")",
             f->path, f->expected_size, (uint64_t)st.st_size, r->req_len, r->req_off);
    rd_release(w, r);
}

/* ---- the worker thread ---- */

static void efd_arm(struct worker *w)
{
    struct io_uring_sqe *sqe = get_sqe(w);

    io_uring_prep_read(sqe, w->efd, &w->efd_val, sizeof(w->efd_val), 0);
    io_uring_sqe_set_data(sqe, NULL);
    w->efd_armed = true;
}

static void wake(struct worker *w)
{
    uint64_t one = 1;

    /* A blocking eventfd only fails to take 1 when its counter is near
     * 2^64, which cannot happen. */
    if (write(w->efd, &one, sizeof(one)) != (ssize_t)sizeof(one))
        moe_log_once(MOE_LOG_ERROR, "pager: cannot wake pager thread %d: %s", w->idx,
                     strerror(errno));
}

static void list_push(struct moe_pager_job **head, struct moe_pager_job **tail,
                      struct moe_pager_job *j)
{
    j->next_ = NULL;
    if (*tail)
        (*tail)->next_ = j;
    else
        *head = j;
    *tail = j;
}

static struct moe_pager_job *list_pop(struct moe_pager_job **head, struct moe_pager_job **tail)
{
    struct moe_pager_job *j = *head;

    if (j) {
        *head = j->next_;
        if (!*head)
            *tail = NULL;
        j->next_ = NULL;
    }
    return j;
}

/* Starts chunks of pending jobs while slots are free: urgent jobs first; a
 * job being started that is not urgent is parked (its cursor kept) at the
 * front of the others when an urgent one is waiting. */
static void fill(struct worker *w)
{
    while (w->inflight < w->p->depth) {
        struct moe_pager_job *j = w->cur;

        if (j && !j->urgent && w->urgent_head) {
            j->parked_ = true;
            j->next_ = w->pending_head;
            w->pending_head = j;
            if (!w->pending_tail)
                w->pending_tail = j;
            w->cur = j = NULL;
        }
        if (!j) {
            j = list_pop(&w->urgent_head, &w->urgent_tail);
            if (!j)
                j = list_pop(&w->pending_head, &w->pending_tail);
            if (!j)
                return;
            j->parked_ = false;
            w->cur = j;
        }
        if (!job_next_chunk(w, j)) {
            w->cur = NULL;
            if (j->chunks_left_ == 0)
                job_finish(w, j);
        }
    }
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct io_uring_cqe *cqes[CQE_BATCH];

    for (;;) {
        struct moe_pager_job *head, *tail;
        bool stop;
        unsigned n;
        int r;

        pthread_mutex_lock(&w->lock);
        head = w->qhead;
        tail = w->qtail;
        w->qhead = w->qtail = NULL;
        stop = w->stop;
        pthread_mutex_unlock(&w->lock);
        (void)tail;
        while (head) {
            struct moe_pager_job *j = head;

            head = j->next_;
            if (j->urgent)
                list_push(&w->urgent_head, &w->urgent_tail, j);
            else
                list_push(&w->pending_head, &w->pending_tail, j);
        }
        fill(w);
        if (stop && !w->cur && !w->pending_head && !w->urgent_head && w->inflight == 0)
            break;
        if (!w->efd_armed)
            efd_arm(w);
        r = io_uring_submit_and_wait(&w->ring, 1);
        if (r < 0 && r != -EINTR) {
            if (r != -EAGAIN && r != -EBUSY)
                moe_log_once(MOE_LOG_ERROR, "pager: io_uring_submit failed: %s; retrying",
                             strerror(-r));
            /* Out of kernel resources: let completions drain first. */
            if (io_uring_cq_ready(&w->ring) == 0)
                usleep(1000);
        }
        n = io_uring_peek_batch_cqe(&w->ring, cqes, CQE_BATCH);
        for (unsigned i = 0; i < n; i++) {
            struct rd *rd = io_uring_cqe_get_data(cqes[i]);

            if (!rd)
                w->efd_armed = false; /* the eventfd fired (or was cancelled): re-arm */
            else
                on_read(w, rd, cqes[i]->res);
        }
        io_uring_cq_advance(&w->ring, n);
    }
    return NULL;
}

/* ---- setup and teardown ---- */

static int ring_init(struct worker *w, unsigned entries)
{
    struct io_uring_params par;
    int r;

    /* COOP_TASKRUN: the thread always enters the kernel to wait, so no IPI
     * is needed to run completions; SUBMIT_ALL: one bad request does not
     * hold back the rest of the batch.  Older kernels refuse the flags. */
    memset(&par, 0, sizeof(par));
    par.flags = IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL;
    r = io_uring_queue_init_params(entries, &w->ring, &par);
    if (r == -EINVAL) {
        memset(&par, 0, sizeof(par));
        r = io_uring_queue_init_params(entries, &w->ring, &par);
    }
    if (r == 0)
        w->ring_ok = true;
    return r;
}

static int piece_cmp(const void *a, const void *b)
{
    const struct reg_piece *x = a, *y = b;

    return x->start < y->start ? -1 : x->start > y->start;
}

/* Cuts cfg.regions into pieces the kernel takes and registers them with
 * every ring; on refusal, logs once and goes on without. */
static int register_buffers(struct moe_pager *p, const struct moe_pager_config *cfg,
                            struct moe_error *err)
{
    struct iovec *iov;
    int n = 0, r = 0, done;
    uint64_t total = 0;

    for (int i = 0; i < cfg->n_regions; i++) {
        uint64_t len = cfg->regions[i].iov_len;

        if (len && !cfg->regions[i].iov_base)
            return moe_error_set(err, -EINVAL, "pager: region %d has no address", i);
        n += (int)MOE_MIN((len + REG_PIECE_MAX - 1) / REG_PIECE_MAX, (uint64_t)REG_BUFS_MAX + 1);
        total += len;
        if (n > REG_BUFS_MAX)
            break;
    }
    if (n == 0 || p->no_register)
        return 0;
    if (n > REG_BUFS_MAX) {
        moe_log_once(MOE_LOG_WARN,
                     "pager: %d regions cut into more than %d buffers: reading without "
                     "registered buffers",
                     cfg->n_regions, REG_BUFS_MAX);
        return 0;
    }
    p->pieces = calloc((size_t)n, sizeof(*p->pieces));
    iov = calloc((size_t)n, sizeof(*iov));
    if (!p->pieces || !iov) {
        free(iov);
        return moe_error_set(err, -ENOMEM, "pager: out of memory");
    }
    for (int i = 0; i < cfg->n_regions; i++) {
        uintptr_t a = (uintptr_t)cfg->regions[i].iov_base;
        uint64_t left = cfg->regions[i].iov_len;

        while (left) {
            uint64_t l = MOE_MIN(left, REG_PIECE_MAX);

            p->pieces[p->n_pieces].start = a;
            p->pieces[p->n_pieces].end = a + l;
            p->n_pieces++;
            a += l;
            left -= l;
        }
    }
    qsort(p->pieces, (size_t)p->n_pieces, sizeof(*p->pieces), piece_cmp);
    for (int i = 0; i < p->n_pieces; i++) {
        iov[i].iov_base = (void *)p->pieces[i].start;
        iov[i].iov_len = p->pieces[i].end - p->pieces[i].start;
    }
    for (done = 0; done < p->n_threads; done++) {
        r = io_uring_register_buffers(&p->workers[done].ring, iov, (unsigned)p->n_pieces);
        if (r < 0)
            break;
    }
    free(iov);
    if (r < 0) {
        for (int i = 0; i < done; i++)
            io_uring_unregister_buffers(&p->workers[i].ring);
        moe_log_once(MOE_LOG_WARN,
                     "pager: cannot register %d buffers (%" PRIu64 " bytes) with io_uring: %s; "
                     "reading without registered buffers (raise RLIMIT_MEMLOCK, "
                     "LimitMEMLOCK= in the unit)",
                     p->n_pieces, total, strerror(-r));
        return 0;
    }
    p->bufs_registered = true;
    return 0;
}

/* A sparse file table in every ring; files fill their slots as they come. */
static void register_files(struct moe_pager *p)
{
    struct rlimit rl;
    unsigned slots = MOE_PAGER_MAX_FILES;
    int r = 0, done;

    if (p->no_register || p->buffered)
        return;
    /* The kernel refuses tables larger than RLIMIT_NOFILE. */
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < slots)
        slots = (unsigned)rl.rlim_cur;
    if (slots == 0)
        return;
    for (done = 0; done < p->n_threads; done++) {
        r = io_uring_register_files_sparse(&p->workers[done].ring, slots);
        if (r < 0)
            break;
    }
    if (r < 0) {
        for (int i = 0; i < done; i++)
            io_uring_unregister_files(&p->workers[i].ring);
        moe_log_once(MOE_LOG_INFO,
                     "pager: cannot register a file table with io_uring: %s; using plain fds",
                     strerror(-r));
        return;
    }
    p->files_registered = true;
    p->file_slots = slots;
}

static void file_free(struct pfile *f)
{
    if (!f)
        return;
    if (f->dfd >= 0)
        close(f->dfd);
    if (f->bfd >= 0)
        close(f->bfd);
    pthread_mutex_destroy(&f->lock);
    free(f->path);
    free(f);
}

/* Stops the threads and frees everything; takes half-built pagers. */
static void pager_destroy(struct moe_pager *p)
{
    if (p->workers) {
        for (int i = 0; i < p->n_threads; i++) {
            struct worker *w = &p->workers[i];

            if (!w->thread_started)
                continue;
            pthread_mutex_lock(&w->lock);
            w->stop = true;
            pthread_mutex_unlock(&w->lock);
            wake(w);
            pthread_join(w->thread, NULL);
        }
        for (int i = 0; i < p->n_threads; i++) {
            struct worker *w = &p->workers[i];

            /* Unregisters buffers and files, cancels the eventfd read. */
            if (w->ring_ok)
                io_uring_queue_exit(&w->ring);
            if (w->efd >= 0)
                close(w->efd);
            free(w->rds);
            pthread_mutex_destroy(&w->lock);
        }
    }
    /* Relaxed: the threads are joined, nothing else runs. */
    for (int i = 0; i < atomic_load_explicit(&p->n_files, memory_order_relaxed); i++)
        file_free(atomic_load_explicit(&p->files[i], memory_order_relaxed));
    free(p->workers);
    free(p->pieces);
    pthread_mutex_destroy(&p->files_lock);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->idle);
    free(p);
}

static int check_config(const struct moe_pager_config *cfg, struct moe_error *err)
{
    if (cfg->n_threads < 0 || cfg->n_threads > MAX_THREADS)
        return moe_error_set(err, -EINVAL, "pager: %d threads: expected 0 to %d", cfg->n_threads,
                             MAX_THREADS);
    if (cfg->queue_depth < 0 || cfg->queue_depth > MAX_DEPTH)
        return moe_error_set(err, -EINVAL, "pager: queue depth %d: expected 0 to %d",
                             cfg->queue_depth, MAX_DEPTH);
    if (cfg->chunk_bytes % MOE_PAGER_ALIGN || cfg->chunk_bytes > MAX_CHUNK)
        return moe_error_set(err, -EINVAL,
                             "pager: chunk of %zu bytes: expected a multiple of %u up to %zu",
                             cfg->chunk_bytes, MOE_PAGER_ALIGN, MAX_CHUNK);
    if (cfg->n_regions < 0 || (cfg->n_regions > 0 && !cfg->regions))
        return moe_error_set(err, -EINVAL, "pager: %d regions without a region list",
                             cfg->n_regions);
    return 0;
}

int moe_pager_create(const struct moe_pager_config *cfg, struct moe_pager **ret,
                     struct moe_error *err)
{
    static const struct moe_pager_config defaults;
    struct moe_pager *p;
    sigset_t all, old;
    int r;

    if (!cfg)
        cfg = &defaults;
    r = check_config(cfg, err);
    if (r < 0)
        return r;
    p = calloc(1, sizeof(*p));
    if (!p)
        return moe_error_set(err, -ENOMEM, "pager: out of memory");
    p->n_threads = cfg->n_threads ? cfg->n_threads : 1;
    p->depth = cfg->queue_depth ? cfg->queue_depth : DEF_DEPTH;
    p->chunk = cfg->chunk_bytes ? cfg->chunk_bytes : DEF_CHUNK;
    p->buffered = cfg->buffered;
    p->no_register = cfg->no_register;
    pthread_mutex_init(&p->files_lock, NULL);
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->idle, NULL);
    moe_pager_set_faults(p, &cfg->faults);

    p->workers = calloc((size_t)p->n_threads, sizeof(*p->workers));
    if (!p->workers) {
        r = moe_error_set(err, -ENOMEM, "pager: out of memory");
        goto fail;
    }
    for (int i = 0; i < p->n_threads; i++) {
        struct worker *w = &p->workers[i];

        w->p = p;
        w->idx = i;
        w->efd = -1;
        pthread_mutex_init(&w->lock, NULL);
    }
    for (int i = 0; i < p->n_threads; i++) {
        struct worker *w = &p->workers[i];

        w->rds = calloc((size_t)p->depth, sizeof(*w->rds));
        if (!w->rds) {
            r = moe_error_set(err, -ENOMEM, "pager: out of memory");
            goto fail;
        }
        for (int k = 0; k < p->depth; k++) {
            w->rds[k].next_free = w->free_rds;
            w->free_rds = &w->rds[k];
        }
        w->efd = eventfd(0, EFD_CLOEXEC);
        if (w->efd < 0) {
            r = moe_error_set(err, -errno, "pager: eventfd: %s", strerror(errno));
            goto fail;
        }
        /* Room for every slot's read and the eventfd read. */
        r = ring_init(w, (unsigned)p->depth + 1);
        if (r == -ENOSYS || r == -EPERM) {
            moe_error_set(err, r,
                          "pager: io_uring is not available (kernel.io_uring_disabled or "
                          "seccomp?): %s",
                          strerror(-r));
            goto fail;
        }
        if (r < 0) {
            moe_error_set(err, r, "pager: cannot set up an io_uring of %d entries: %s%s",
                          p->depth + 1, strerror(-r),
                          r == -ENOMEM ? " (RLIMIT_MEMLOCK too low?)" : "");
            goto fail;
        }
    }
    r = register_buffers(p, cfg, err);
    if (r < 0)
        goto fail;
    register_files(p);

    /* Signals go to the program's own threads, never to pager threads. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (int i = 0; i < p->n_threads; i++) {
        struct worker *w = &p->workers[i];
        char name[16];

        r = -pthread_create(&w->thread, NULL, worker_main, w);
        if (r < 0) {
            pthread_sigmask(SIG_SETMASK, &old, NULL);
            moe_error_set(err, r, "pager: cannot start a thread: %s", strerror(-r));
            goto fail;
        }
        w->thread_started = true;
        /* At most MAX_THREADS: two digits. */
        snprintf(name, sizeof(name), "moe-pager%d", i % MAX_THREADS);
        pthread_setname_np(w->thread, name);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    *ret = p;
    return 0;
fail:
    pager_destroy(p);
    return r;
}

void moe_pager_free(struct moe_pager *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->lock);
    while (p->n_jobs > 0)
        pthread_cond_wait(&p->idle, &p->lock);
    p->stopped = true;
    pthread_mutex_unlock(&p->lock);
    pager_destroy(p);
}

int moe_pager_add_file(struct moe_pager *p, const char *path, uint64_t expected_size, int *ret,
                       struct moe_error *err)
{
    struct pfile *f;
    struct stat st;
    bool refused = false;
    int id, n, r = 0;

    pthread_mutex_lock(&p->files_lock);
    /* The lowest free id: one a removed file left, or a new one.  Relaxed:
     * files[] and n_files change only under files_lock, held here. */
    n = atomic_load_explicit(&p->n_files, memory_order_relaxed);
    for (id = 0; id < n; id++)
        if (!atomic_load_explicit(&p->files[id], memory_order_relaxed))
            break;
    if (id >= MOE_PAGER_MAX_FILES) {
        r = moe_error_set(err, -EMFILE,
                          "pager: cannot add '%s': already %d files, the most a pager takes", path,
                          MOE_PAGER_MAX_FILES);
        goto out;
    }
    f = calloc(1, sizeof(*f));
    if (!f || !(f->path = strdup(path))) {
        free(f);
        r = moe_error_set(err, -ENOMEM, "pager: out of memory");
        goto out;
    }
    f->expected_size = expected_size;
    f->dfd = f->bfd = f->slot = -1;
    pthread_mutex_init(&f->lock, NULL);
    if (!p->buffered) {
        f->dfd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
        if (f->dfd < 0 && errno != EINVAL) {
            r = moe_error_set(err, -errno, "pager: cannot open '%s': %s", path, strerror(errno));
            goto out_free;
        }
        refused = f->dfd < 0;
    }
    if (f->dfd < 0) {
        f->bfd = open(path, O_RDONLY | O_CLOEXEC);
        if (f->bfd < 0) {
            r = moe_error_set(err, -errno, "pager: cannot open '%s': %s", path, strerror(errno));
            goto out_free;
        }
    }
    if (fstat(f->dfd >= 0 ? f->dfd : f->bfd, &st) < 0) {
        r = moe_error_set(err, -errno, "pager: cannot stat '%s': %s", path, strerror(errno));
        goto out_free;
    }
    if (!S_ISREG(st.st_mode)) {
        r = moe_error_set(err, -EINVAL, "pager: '%s' is not a regular file", path);
        goto out_free;
    }
    file_ident(f, f->dfd >= 0 ? f->dfd : f->bfd, expected_size);
    if (f->dfd < 0)
        stat_add(&p->st.files_buffered, 1);
    if (refused)
        moe_log(MOE_LOG_WARN,
                "pager: %s: O_DIRECT refused by the filesystem (open: %s), reading through the "
                "page cache",
                path, strerror(EINVAL));
    atomic_init(&f->direct, f->dfd >= 0);
    if (f->dfd >= 0 && p->files_registered && (unsigned)id < p->file_slots) {
        int done;

        for (done = 0; done < p->n_threads; done++) {
            r = io_uring_register_files_update(&p->workers[done].ring, (unsigned)id, &f->dfd, 1);
            if (r < 0)
                break;
        }
        if (done == p->n_threads) {
            f->slot = id;
        } else {
            int none = -1;

            for (int i = 0; i < done; i++)
                io_uring_register_files_update(&p->workers[i].ring, (unsigned)id, &none, 1);
            moe_log_once(MOE_LOG_INFO,
                         "pager: cannot register '%s' with io_uring: %s; using plain fds", path,
                         strerror(-r));
        }
    }
    /* Release: publishes *f; pairs with the acquire loads in check_job()
     * and moe_pager_file_direct(). */
    atomic_store_explicit(&p->files[id], f, memory_order_release);
    if (id == n)
        /* Release: publishes files[id]; pairs with the same loads. */
        atomic_store_explicit(&p->n_files, id + 1, memory_order_release);
    *ret = id;
    r = 0;
    goto out;
out_free:
    file_free(f);
out:
    pthread_mutex_unlock(&p->files_lock);
    return r;
}

int moe_pager_remove_file(struct moe_pager *p, int file)
{
    struct pfile *f;

    if (!p)
        return 0;
    pthread_mutex_lock(&p->files_lock);
    /* Relaxed: files[] and n_files change only under files_lock, held here. */
    if (file < 0 || file >= atomic_load_explicit(&p->n_files, memory_order_relaxed) ||
        !(f = atomic_load_explicit(&p->files[file], memory_order_relaxed))) {
        pthread_mutex_unlock(&p->files_lock);
        return -ENOENT;
    }
    /* The rings hold the file too: a registered slot keeps it open (and a
     * deleted file's blocks allocated) until it is emptied. */
    if (f->slot >= 0) {
        int none = -1;

        for (int i = 0; i < p->n_threads; i++) {
            int r =
                io_uring_register_files_update(&p->workers[i].ring, (unsigned)f->slot, &none, 1);

            if (r < 0)
                moe_log(MOE_LOG_WARN,
                        "pager: cannot drop '%s' from the file table of ring %d: %s; it stays "
                        "open until moed stops",
                        f->path, i, strerror(-r));
        }
    }
    /* Release: pairs with the acquire loads in check_job() and
     * moe_pager_file_direct(), which now refuse the id. */
    atomic_store_explicit(&p->files[file], NULL, memory_order_release);
    pthread_mutex_unlock(&p->files_lock);
    file_free(f);
    return 0;
}

static int check_job(struct moe_pager *p, const struct moe_pager_job *job, struct moe_error *err)
{
    /* Acquire: pairs with the release in moe_pager_add_file(). */
    int n_files = atomic_load_explicit(&p->n_files, memory_order_acquire);

    if (!job || !job->done)
        return moe_error_set(err, -EINVAL, "pager: job without a done callback");
    if (job->n_segs < 0 || (job->n_segs > 0 && !job->segs))
        return moe_error_set(err, -EINVAL, "pager: job with %d segments and no segment list",
                             job->n_segs);
    for (int i = 0; i < job->n_segs; i++) {
        const struct moe_pager_seg *s = &job->segs[i];
        const struct pfile *f;
        uint64_t end;

        /* Acquire: pairs with the release in moe_pager_add_file() (and
         * _remove_file()). */
        if (s->file < 0 || s->file >= n_files ||
            !(f = atomic_load_explicit(&p->files[s->file], memory_order_acquire)))
            return moe_error_set(err, -EINVAL, "pager: segment %d: no file %d (the pager has %d)",
                                 i, s->file, n_files);
        if ((s->offset | s->len | (uintptr_t)s->dst) & ALIGN_MASK)
            return moe_error_set(err, -EINVAL,
                                 "pager: segment %d of %s: offset %" PRIu64 ", length %" PRIu64
                                 " and buffer %p must be multiples of %u",
                                 i, f->path, s->offset, s->len, s->dst, MOE_PAGER_ALIGN);
        if (s->need > s->len)
            return moe_error_set(err, -EINVAL,
                                 "pager: segment %d of %s: needs %" PRIu64 " bytes of %" PRIu64, i,
                                 f->path, s->need, s->len);
        if (__builtin_add_overflow(s->offset, s->len, &end) || end > (uint64_t)INT64_MAX ||
            (s->len && !s->dst))
            return moe_error_set(
                err, -EINVAL, "pager: segment %d of %s: bad range %" PRIu64 "+%" PRIu64 " into %p",
                i, f->path, s->offset, s->len, s->dst);
    }
    return 0;
}

int moe_pager_submit(struct moe_pager *p, struct moe_pager_job *job, struct moe_error *err)
{
    struct worker *w = NULL;
    unsigned start;
    bool was_empty;
    int r, best = 0;

    r = check_job(p, job, err);
    if (r < 0)
        return r;
    pthread_mutex_lock(&p->lock);
    if (p->stopped) {
        pthread_mutex_unlock(&p->lock);
        return moe_error_set(err, -ESHUTDOWN, "pager: shutting down");
    }
    p->n_jobs++;
    pthread_mutex_unlock(&p->lock);

    job->next_ = NULL;
    job->parked_ = false;
    job->chunks_left_ = 0;
    job->next_seg_ = 0;
    job->next_off_ = 0;
    job->status_ = 0;
    job->msg_[0] = 0;

    /* The least loaded worker, ties spread round robin. */
    start = atomic_fetch_add_explicit(&p->rr, 1, memory_order_relaxed);
    for (int i = 0; i < p->n_threads; i++) {
        struct worker *c = &p->workers[(start + (unsigned)i) % (unsigned)p->n_threads];
        int l = atomic_load_explicit(&c->load, memory_order_relaxed);

        if (!w || l < best) {
            w = c;
            best = l;
        }
    }
    atomic_fetch_add_explicit(&w->load, 1, memory_order_relaxed);
    pthread_mutex_lock(&w->lock);
    was_empty = !w->qhead;
    if (w->qtail)
        w->qtail->next_ = job;
    else
        w->qhead = job;
    w->qtail = job;
    pthread_mutex_unlock(&w->lock);
    /* The worker empties the whole queue when it takes it, so a job put on
     * an empty queue is the only one that needs a wakeup. */
    if (was_empty)
        wake(w);
    return 0;
}

void moe_pager_set_faults(struct moe_pager *p, const struct moe_pager_faults *f)
{
    static const struct moe_pager_faults none;

    if (!f)
        f = &none;
    atomic_store_explicit(&p->faults.fail_nth, f->fail_nth, memory_order_relaxed);
    atomic_store_explicit(&p->faults.short_nth, f->short_nth, memory_order_relaxed);
    atomic_store_explicit(&p->faults.corrupt_nth, f->corrupt_nth, memory_order_relaxed);
    atomic_store_explicit(&p->faults.every, f->every, memory_order_relaxed);
    atomic_store_explicit(&p->faults.refuse_direct, f->refuse_direct, memory_order_relaxed);
    atomic_store_explicit(&p->faults.count, 0, memory_order_relaxed);
}

void moe_pager_get_stats(struct moe_pager *p, struct moe_pager_stats *ret)
{
    memset(ret, 0, sizeof(*ret));
    ret->jobs_done = rd_load(&p->st.jobs_done);
    ret->jobs_failed = rd_load(&p->st.jobs_failed);
    ret->reads = rd_load(&p->st.reads);
    ret->short_reads = rd_load(&p->st.short_reads);
    ret->bytes_read = rd_load(&p->st.bytes_read);
    ret->files_buffered = rd_load(&p->st.files_buffered);
    ret->buffers_registered = p->bufs_registered;
    ret->files_registered = p->files_registered;
}

int moe_pager_refresh_file(struct moe_pager *p, int file)
{
    struct pfile *f;
    int r;

    /* Acquire: pairs with the releases in moe_pager_add_file() and
     * _remove_file(). */
    if (!p || file < 0 || file >= atomic_load_explicit(&p->n_files, memory_order_acquire) ||
        !(f = atomic_load_explicit(&p->files[file], memory_order_acquire)))
        return -ENOENT;
    pthread_mutex_lock(&f->lock);
    r = file_ident(f, f->dfd >= 0 ? f->dfd : f->bfd, 0);
    pthread_mutex_unlock(&f->lock);
    return r;
}

int moe_pager_file_unchanged(struct moe_pager *p, int file)
{
    struct pfile *f;
    struct stat st;
    int r;

    /* Acquire: pairs with the releases in moe_pager_add_file() and
     * _remove_file(). */
    if (!p || file < 0 || file >= atomic_load_explicit(&p->n_files, memory_order_acquire) ||
        !(f = atomic_load_explicit(&p->files[file], memory_order_acquire)))
        return -ENOENT;
    pthread_mutex_lock(&f->lock);
    if (fstat(f->dfd >= 0 ? f->dfd : f->bfd, &st) < 0)
        r = -errno;
    else
        r = ident_same(f, &st);
    pthread_mutex_unlock(&f->lock);
    return r;
}

bool moe_pager_file_direct(struct moe_pager *p, int file)
{
    struct pfile *f;

    /* Acquire: pairs with the releases in moe_pager_add_file() and
     * _remove_file(). */
    if (file < 0 || file >= atomic_load_explicit(&p->n_files, memory_order_acquire) ||
        !(f = atomic_load_explicit(&p->files[file], memory_order_acquire)))
        return false;
    /* Acquire: pairs with the release in file_fallback(). */
    return atomic_load_explicit(&f->direct, memory_order_acquire);
}
