/*
 * The pager: reads byte ranges of model files into memory with io_uring.
 *
 * One io_uring per pager thread (liburing).  A job is a list of segments
 * (file, offset, length, destination); the pager splits each segment into
 * chunks of cfg.chunk_bytes, keeps up to cfg.queue_depth reads in flight per
 * thread, resubmits short reads for the rest, and calls the job's done
 * callback once, on a pager thread, when every byte has arrived or the job
 * has failed.
 *
 * Files are opened by the pager itself (moe_pager_add_file) with O_DIRECT,
 * and registered with each ring (io_uring_register_files) where the kernel
 * allows.  Where O_DIRECT is refused (tmpfs and some filesystems: open or
 * the first read fails with EINVAL) the file falls back to buffered reads,
 * and the pager says so once in the log.
 *
 * Alignment (O_DIRECT): a segment's offset, its dst address and its length
 * must be multiples of MOE_PAGER_ALIGN.  Callers whose byte ranges are not
 * aligned read the aligned span around them (moe_pager_span) into an aligned
 * buffer and use the bytes inside it.  A segment may run past the end of
 * the file (the span of the last tensor of a file usually does): only the
 * first `need` bytes must exist.  If the file ends before offset + need, the
 * job fails with -EIO and a message saying the file was truncated since it
 * was loaded (its size then and now).
 *
 * Buffers inside the regions given in cfg.regions are registered with every
 * ring (io_uring_register_buffers) and read with read_fixed; if the kernel
 * refuses to register them (RLIMIT_MEMLOCK, old kernel), the pager logs
 * that once and reads them unregistered.  Registering faults in and pins
 * every page of the regions for the life of the pager (the kernel takes at
 * most 1 GiB per buffer, so larger regions are registered as 1 GiB pieces;
 * a read that straddles two pieces goes unregistered).
 *
 * Errors: a read that fails (EIO, ...) fails the job: done(job, -errno, msg)
 * with msg naming the file, the offset and the error.  Other jobs carry on.
 * A file whose identity (device, inode, size, mtime, by fstat on the fd the
 * pager reads) is not the one it had when added fails every job that reads
 * it with -EBADMSG, naming the file, once the job's reads are done: a
 * checkpoint modified in place is never served as the one loaded.
 * The pager never retries a failed job by itself.
 *
 * Fault injection, for tests: cfg.faults (or moe_pager_set_faults at run
 * time) makes the Nth read completion (counted from 1 over the whole pager,
 * in completion order) fail with EIO, come back short (half its length,
 * rounded down to MOE_PAGER_ALIGN, at least one unit less than asked; reads
 * of one unit or less are left whole), or have one byte flipped in its
 * buffer (where varies with N: a transient fault, not a bad sector).  0
 * disables each.  `every` repeats a fault every N reads instead of once.
 * refuse_direct makes O_DIRECT reads fail with EINVAL as on a
 * filesystem that refuses O_DIRECT after open, so that tests reach the
 * buffered fallback on any filesystem.
 *
 * Thread safety: moe_pager_submit may be called from any thread at any time;
 * done callbacks run on pager threads and must not block for long (they may
 * take the caller's locks, and they may submit new jobs).
 * moe_pager_add_file must not race with submits that name the new file, nor
 * moe_pager_remove_file with jobs that name the file it removes.
 */
#ifndef MOED_ENGINE_PAGER_H
#define MOED_ENGINE_PAGER_H

#include "common.h"

#include <sys/uio.h>

#define MOE_PAGER_ALIGN 4096u
#define MOE_PAGER_MAX_FILES 4096 /* files per pager */

struct moe_pager;

struct moe_pager_faults {
    uint64_t fail_nth;    /* the Nth read fails with EIO */
    uint64_t short_nth;   /* the Nth read comes back short */
    uint64_t corrupt_nth; /* the Nth read has a byte flipped */
    bool every;           /* repeat: every Nth read, not only the Nth */
    bool refuse_direct;   /* O_DIRECT reads fail with EINVAL until one has
                           * succeeded, as on a filesystem without O_DIRECT
                           * (exercises the fallback to buffered reads) */
};

struct moe_pager_config {
    int n_threads;               /* pager threads, each with its own ring; 0: 1 */
    int queue_depth;             /* reads in flight per thread; 0: 32 */
    size_t chunk_bytes;          /* bytes per read; 0: 1 MiB; a multiple of MOE_PAGER_ALIGN */
    bool buffered;               /* never use O_DIRECT */
    bool no_register;            /* do not register files or buffers */
    const struct iovec *regions; /* memory to register as fixed buffers; may be NULL */
    int n_regions;
    struct moe_pager_faults faults;
};

struct moe_pager_seg {
    int file;        /* from moe_pager_add_file */
    uint64_t offset; /* MOE_PAGER_ALIGN-aligned */
    uint64_t len;    /* bytes to read, MOE_PAGER_ALIGN multiple */
    uint64_t need;   /* bytes that must exist (<= len); fewer -> truncated */
    void *dst;       /* MOE_PAGER_ALIGN-aligned, len bytes */
};

struct moe_pager_job;
/* status 0, or -errno with msg (NUL-terminated, one line) saying what failed. */
typedef void (*moe_pager_done_fn)(struct moe_pager_job *job, int status, const char *msg);

/*
 * A page-in.  The caller owns the job and its segments and keeps them alive
 * until done is called; the pager's bookkeeping lives in the private fields.
 */
struct moe_pager_job {
    const struct moe_pager_seg *segs;
    int n_segs;
    moe_pager_done_fn done;
    void *arg;   /* for the caller */
    bool urgent; /* goes before every job not urgent, even one already started
                  * (a demand page-in overtaking prefetches) */

    /* private to the pager */
    struct moe_pager_job *next_;
    bool parked_; /* started, set aside for an urgent job */
    int64_t chunks_left_;
    uint64_t next_seg_, next_off_; /* chunking cursor */
    int status_;
    char msg_[256];
};

/* Per-pager counters (monotonic since creation). */
struct moe_pager_stats {
    uint64_t jobs_done;
    uint64_t jobs_failed;
    uint64_t reads;       /* read completions */
    uint64_t short_reads; /* resubmitted remainders */
    uint64_t bytes_read;
    uint64_t files_buffered; /* files read without O_DIRECT */
    bool buffers_registered; /* regions registered with the rings */
    bool files_registered;
};

/* Creates the pager and starts its threads.  -errno with err: io_uring
 * unavailable (io_uring_disabled, seccomp), out of memory, bad config. */
int moe_pager_create(const struct moe_pager_config *cfg, struct moe_pager **ret,
                     struct moe_error *err);
/* Waits for jobs in flight (their done callbacks run), stops the threads,
 * closes the files.  NULL is a no-op. */
void moe_pager_free(struct moe_pager *p);

/*
 * Opens path for reading (O_DIRECT unless refused or cfg.buffered) and
 * returns its id in *ret.  expected_size is the size the caller saw when it
 * loaded the file (for the "truncated since load" message).  0 or -errno
 * (-EMFILE past MOE_PAGER_MAX_FILES files).
 */
int moe_pager_add_file(struct moe_pager *p, const char *path, uint64_t expected_size, int *ret,
                       struct moe_error *err);

/*
 * Closes file id and drops it from every ring's file table, so that nothing
 * of the pager keeps it open (a deleted file's space is freed); the id may
 * be given to a file added later.  No job naming the file may be in flight
 * or submitted from now on (the caller's to ensure; submits naming it are
 * refused).  0, or -ENOENT for an id not in use.  NULL p is a no-op.
 */
int moe_pager_remove_file(struct moe_pager *p, int file);

/*
 * Takes file id's identity now as the one to check against (the caller
 * knows the file is whole again: the operator said so by a retry).  0,
 * -ENOENT for an id not in use, or -errno from fstat.
 */
int moe_pager_refresh_file(struct moe_pager *p, int file);

/*
 * Whether file id has, now, the identity it is checked against (that of
 * moe_pager_add_file or the last moe_pager_refresh_file): 1 yes, 0 no (the
 * page-ins of it fail), -ENOENT for an id not in use, or -errno from fstat.
 * For the cache's retry of an expert once its file is put back.
 */
int moe_pager_file_unchanged(struct moe_pager *p, int file);

/* Queues the job.  0 (done will be called exactly once), or -errno with
 * err for a malformed job (bad file id, misaligned segment), in which case
 * done is not called. */
int moe_pager_submit(struct moe_pager *p, struct moe_pager_job *job, struct moe_error *err);

/* Replaces the fault-injection settings and restarts the read count. */
void moe_pager_set_faults(struct moe_pager *p, const struct moe_pager_faults *f);

void moe_pager_get_stats(struct moe_pager *p, struct moe_pager_stats *ret);

/* True when file id reads with O_DIRECT. */
bool moe_pager_file_direct(struct moe_pager *p, int file);

/* The aligned span [*start, *start + *len) around [offset, offset + len). */
static inline void moe_pager_span(uint64_t offset, uint64_t len, uint64_t *start, uint64_t *span)
{
    uint64_t a = offset & ~(uint64_t)(MOE_PAGER_ALIGN - 1);
    uint64_t e = (offset + len + MOE_PAGER_ALIGN - 1) & ~(uint64_t)(MOE_PAGER_ALIGN - 1);

    *start = a;
    *span = e - a;
}

#endif
