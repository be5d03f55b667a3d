/*
 * Benchmark of the pager (engine/pager.c) against fio on the same file in
 * the same run.
 *
 * 1. Writes a data file of --size bytes in --dir (a pseudo-random 64 MiB
 *    block over and over, fsync'd, then dropped from the page cache) and
 *    warns when the directory is on tmpfs.
 * 2. Pager throughput: the whole file read as expert-sized jobs (88,080,384
 *    bytes, a DeepSeek-V3 expert: 3 x 7168 x 2048 bf16), several in flight,
 *    O_DIRECT, into registered buffers; GB/s and CPU seconds per GB.
 * 3. fio on the same file (`fio --rw=read --ioengine=io_uring --direct=1
 *    --bs=1M --iodepth=32`) and the ratio pager/fio (target >= 0.9).
 *    Without fio there is no ratio.  Pager and fio take turns, three passes
 *    each (one with --quick), since a virtual disk's speed drifts between
 *    runs: the ratio is of the best passes, with that of the medians.  fio
 *    runs a second time with --fixedbufs --registerfiles ("fio-r"), as the
 *    pager reads into registered buffers: the like-for-like comparison.
 * 4. Page-in latency of one expert alone (nothing else in flight): Mixtral
 *    (352,321,536 bytes, 3 x 4096 x 14336 bf16; skipped when the file is
 *    smaller) and DeepSeek-V3, several times each: p50 and max in ms, the
 *    GB/s that p50 implies and its ratio to fio's bandwidth.
 *
 * Every job's first and last 4 KiB are checked against the file's content.
 * Speed is reported, never asserted: the exit status is 0 unless something
 * failed (I/O error, wrong bytes, bad options).
 *
 * Usage: bench-pager [--quick] [--size BYTES] [--dir DIR] [--file PATH] [--keep]
 *                    [--threads N] [--depth N] [--chunk BYTES] [--inflight N]
 *                    [--job BYTES] [--no-register] [--no-fio]
 * --quick: a 256 MiB file and fewer repetitions, a few seconds; ctest runs
 * it as a smoke test.  The file is removed at the end unless --keep;
 * --file reads a file kept by an earlier run instead of writing one.
 * --job sets the size of the jobs of the throughput runs (default: the
 * DeepSeek-V3 expert).
 */
#include "bench.h"
#include "common.h"
#include "pager.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <linux/magic.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#define DEEPSEEK_EXPERT ((uint64_t)88080384) /* 3 x 7168 x 2048 x 2 */
#define MIXTRAL_EXPERT ((uint64_t)352321536) /* 3 x 4096 x 14336 x 2 */
#define BLOCK ((size_t)64 << 20)             /* the repeated content */
#define MAX_INFLIGHT 16
#define MAX_PASSES 3

struct opts {
    bool quick, keep, size_given, no_register, no_fio;
    uint64_t size;
    const char *dir;
    const char *file; /* an existing file to read instead (kept) */
    int threads, depth, inflight;
    uint64_t chunk;
    uint64_t job; /* bytes per job in the throughput runs */
};

static void usage(void)
{
    fprintf(stderr,
            "usage: bench-pager [--quick] [--size BYTES] [--dir DIR] [--file PATH] [--keep]\n"
            "                   [--threads N] [--depth N] [--chunk BYTES] [--inflight N]\n"
            "                   [--job BYTES] [--no-register] [--no-fio]\n");
    exit(2);
}

static uint64_t parse_bytes_opt(const char *s)
{
    struct moe_error err = {0};
    uint64_t v;

    if (moe_parse_bytes(s, &v, &err) < 0) {
        fprintf(stderr, "bench-pager: %s\n", err.msg);
        usage();
    }
    return v;
}

static int parse_int_opt(const char *s, int lo, int hi)
{
    char *end;
    long v = strtol(s, &end, 10);

    if (end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "bench-pager: '%s': expected %d to %d\n", s, lo, hi);
        usage();
    }
    return (int)v;
}

static void parse(int argc, char **argv, struct opts *o)
{
    memset(o, 0, sizeof(*o));
    o->dir = ".";
    o->inflight = 4;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;

        if (!strcmp(a, "--quick")) {
            o->quick = true;
        } else if (!strcmp(a, "--keep")) {
            o->keep = true;
        } else if (!strcmp(a, "--no-register")) {
            o->no_register = true;
        } else if (!strcmp(a, "--no-fio")) {
            o->no_fio = true;
        } else if (!v) {
            usage();
        } else if (!strcmp(a, "--size")) {
            o->size = parse_bytes_opt(v), o->size_given = true, i++;
        } else if (!strcmp(a, "--dir")) {
            o->dir = v, i++;
        } else if (!strcmp(a, "--file")) {
            o->file = v, i++;
        } else if (!strcmp(a, "--threads")) {
            o->threads = parse_int_opt(v, 1, 64), i++;
        } else if (!strcmp(a, "--depth")) {
            o->depth = parse_int_opt(v, 1, 4096), i++;
        } else if (!strcmp(a, "--inflight")) {
            o->inflight = parse_int_opt(v, 1, MAX_INFLIGHT), i++;
        } else if (!strcmp(a, "--job")) {
            o->job = parse_bytes_opt(v), i++;
        } else if (!strcmp(a, "--chunk")) {
            o->chunk = parse_bytes_opt(v), i++;
        } else {
            usage();
        }
    }
    if (!o->job)
        o->job = DEEPSEEK_EXPERT;
    if (o->job % MOE_PAGER_ALIGN || o->job > ((uint64_t)1 << 32)) {
        fprintf(stderr, "bench-pager: --job must be a multiple of %u up to 4 GiB\n",
                MOE_PAGER_ALIGN);
        exit(2);
    }
    if (!o->size)
        o->size = o->quick ? (uint64_t)256 << 20 : (uint64_t)4 << 30;
    o->size &= ~(uint64_t)(MOE_PAGER_ALIGN - 1);
    if (o->size < (16u << 20)) {
        fprintf(stderr, "bench-pager: --size must be at least 16 MiB\n");
        exit(2);
    }
}

static double secs(uint64_t ns)
{
    return (double)ns * 1e-9;
}

static double cpu_secs(void)
{
    struct rusage ru;

    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6;
}

static void *map(uint64_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

    if (p == MAP_FAILED) {
        fprintf(stderr, "bench-pager: cannot map %" PRIu64 " bytes: %s\n", bytes, strerror(errno));
        exit(1);
    }
    return p;
}

/* ---- the data file ---- */

static char *made_path; /* the file this run wrote, removed at exit */

static void remove_made(void)
{
    if (made_path)
        unlink(made_path);
}

static uint8_t *block; /* content of every BLOCK bytes of the file */

static void make_block(void)
{
    uint64_t s = 0x243f6a8885a308d3ull;

    block = map(BLOCK);
    for (size_t i = 0; i < BLOCK; i += 8) {
        /* splitmix64 */
        uint64_t z = (s += 0x9e3779b97f4a7c15ull);

        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        memcpy(block + i, &z, 8);
    }
}

static char *make_file(struct opts *o)
{
    struct statfs sfs;
    char *path;
    uint64_t t0 = moe_now_ns(), left = o->size;
    int fd;

    if (o->file) {
        struct stat st;

        if (stat(o->file, &st) < 0) {
            fprintf(stderr, "bench-pager: %s: %s\n", o->file, strerror(errno));
            exit(1);
        }
        if (!o->size_given || o->size > (uint64_t)st.st_size)
            o->size = (uint64_t)st.st_size & ~(uint64_t)(MOE_PAGER_ALIGN - 1);
        o->keep = true;
        printf("file     %s: %.2f GiB (existing)\n", o->file, (double)o->size / (1 << 30));
        return strdup(o->file);
    }
    if (statfs(o->dir, &sfs) == 0 && sfs.f_type == TMPFS_MAGIC)
        fprintf(stderr,
                "warning: %s is on tmpfs: reads come from memory, not a disk, and "
                "the figures say nothing about page-ins from NVMe\n",
                o->dir);
    if (asprintf(&path, "%s/moed-bench-pager-XXXXXX", o->dir) < 0)
        exit(1);
    fd = mkstemp(path);
    if (fd < 0) {
        fprintf(stderr, "bench-pager: cannot create a file in %s: %s\n", o->dir, strerror(errno));
        exit(1);
    }
    if (!o->keep) {
        made_path = path;
        atexit(remove_made);
    }
    while (left) {
        size_t n = (size_t)MOE_MIN(left, (uint64_t)BLOCK);
        ssize_t w = write(fd, block, n);

        if (w <= 0) {
            fprintf(stderr, "bench-pager: cannot write %s: %s\n", path,
                    w < 0 ? strerror(errno) : "short write");
            exit(1);
        }
        /* w is a multiple of 8 in practice; keep the pattern aligned anyway */
        if ((size_t)w != n) {
            fprintf(stderr, "bench-pager: short write to %s\n", path);
            exit(1);
        }
        left -= (uint64_t)w;
    }
    if (fsync(fd) < 0) {
        fprintf(stderr, "bench-pager: fsync %s: %s\n", path, strerror(errno));
        exit(1);
    }
    /* The reads below are O_DIRECT; give the memory back. */
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
    printf("file     %s: %.2f GiB written in %.1f s%s\n", path, (double)o->size / (1 << 30),
           secs(moe_now_ns() - t0), o->quick ? " (--quick)" : "");
    return path;
}

/* The first and last 4 KiB of a job's buffer hold the file's bytes. */
static bool content_ok(const uint8_t *buf, uint64_t off, uint64_t len)
{
    uint64_t probes[2] = {off, off + len - MOE_PAGER_ALIGN};

    for (int i = 0; i < 2; i++) {
        uint64_t b = probes[i] % BLOCK;

        if (memcmp(buf + (probes[i] - off), block + b, MOE_PAGER_ALIGN) != 0)
            return false;
    }
    return true;
}

/* ---- pager runs ---- */

struct run;

struct slot {
    struct moe_pager_job job;
    struct moe_pager_seg seg;
    uint8_t *buf;
    struct run *run;
};

struct run {
    struct moe_pager *p;
    int file;
    uint64_t size, job_bytes;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    uint64_t next_off; /* guarded by lock */
    int active;        /* slots with a job in flight; guarded by lock */
    int failed;        /* guarded by lock */
    bool bad_bytes;    /* guarded by lock */
    char msg[256];     /* guarded by lock */
};

/* Takes the next job's range, or false at the end of the file. */
static bool next_range(struct run *r, struct slot *s)
{
    bool more = false;

    pthread_mutex_lock(&r->lock);
    if (r->next_off < r->size && !r->failed) {
        s->seg.offset = r->next_off;
        s->seg.len = MOE_MIN(r->job_bytes, r->size - r->next_off);
        s->seg.need = s->seg.len;
        r->next_off += s->seg.len;
        more = true;
    } else {
        r->active--;
        pthread_cond_broadcast(&r->cond);
    }
    pthread_mutex_unlock(&r->lock);
    return more;
}

static void slot_submit(struct slot *s)
{
    struct moe_error err = {0};
    int e;

    if (!next_range(s->run, s))
        return;
    e = moe_pager_submit(s->run->p, &s->job, &err);
    if (e < 0) {
        fprintf(stderr, "bench-pager: submit: %s\n", err.msg);
        exit(1);
    }
}

/* On a pager thread: check the bytes, start the slot's next job. */
static void slot_done(struct moe_pager_job *j, int status, const char *msg)
{
    struct slot *s = j->arg;
    struct run *r = s->run;

    if (status || !content_ok(s->buf, s->seg.offset, s->seg.len)) {
        pthread_mutex_lock(&r->lock);
        r->failed++;
        if (status)
            snprintf(r->msg, sizeof(r->msg), "%s", msg);
        else
            snprintf(r->msg, sizeof(r->msg), "wrong bytes at offset %" PRIu64, s->seg.offset);
        pthread_mutex_unlock(&r->lock);
    }
    slot_submit(s);
}

static void run_wait(struct run *r)
{
    pthread_mutex_lock(&r->lock);
    while (r->active > 0)
        pthread_cond_wait(&r->cond, &r->lock);
    pthread_mutex_unlock(&r->lock);
    if (r->failed) {
        fprintf(stderr, "bench-pager: %d jobs failed: %s\n", r->failed, r->msg);
        exit(1);
    }
}

/* Reads [0, size) as jobs of job_bytes with n in flight; returns seconds. */
static double read_all(struct run *r, struct slot *slots, int n, uint64_t size, uint64_t job_bytes)
{
    uint64_t t0;

    r->size = size;
    r->job_bytes = job_bytes;
    r->next_off = 0;
    r->active = n;
    r->failed = 0;
    t0 = moe_now_ns();
    for (int i = 0; i < n; i++)
        slot_submit(&slots[i]);
    run_wait(r);
    return secs(moe_now_ns() - t0);
}

/* "  pager    3.81 GB/s  (best; passes 3.81, 3.45, 3.60 GB/s" */
static void print_bw(const char *what, const double *bw, int n)
{
    printf("  %-5s  %6.2f GB/s  (best; passes", what, bench_best(bw, n) * 1e-9);
    for (int i = 0; i < n; i++)
        printf("%s %.2f", i ? "," : "", bw[i] * 1e-9);
    printf(" GB/s");
}

int main(int argc, char **argv)
{
    struct moe_pager_config cfg = {0};
    struct moe_pager_stats st;
    struct moe_error err = {0};
    struct iovec regions[MAX_INFLIGHT + 1];
    struct slot slots[MAX_INFLIGHT];
    struct run run = {0};
    struct opts o;
    double pager_bw[MAX_PASSES], fio_bw[MAX_PASSES], fio_reg_bw[MAX_PASSES], fio_best = 0;
    double cpu_per_gb = 0;
    bool have_fio;
    int passes;
    uint64_t lat_bytes[2] = {MIXTRAL_EXPERT, DEEPSEEK_EXPERT};
    uint8_t *lat_buf;
    char *path;
    int e;

    parse(argc, argv, &o);
    passes = o.quick ? 1 : MAX_PASSES;
    have_fio = !o.no_fio;
    setvbuf(stdout, NULL, _IOLBF, 0);
    make_block();
    path = make_file(&o);

    /* Buffers: one per job in flight, and one for the latency runs. */
    for (int i = 0; i < o.inflight; i++) {
        slots[i].buf = map(o.job);
        slots[i].run = &run;
        slots[i].seg.dst = slots[i].buf;
        slots[i].job = (struct moe_pager_job){
            .segs = &slots[i].seg, .n_segs = 1, .done = slot_done, .arg = &slots[i]};
        regions[i] = (struct iovec){slots[i].buf, o.job};
    }
    lat_buf = map(MIXTRAL_EXPERT);
    regions[o.inflight] = (struct iovec){lat_buf, MIXTRAL_EXPERT};

    cfg.n_threads = o.threads;
    cfg.queue_depth = o.depth;
    cfg.chunk_bytes = o.chunk;
    cfg.no_register = o.no_register;
    cfg.regions = regions;
    cfg.n_regions = o.inflight + 1;
    e = moe_pager_create(&cfg, &run.p, &err);
    if (e < 0) {
        fprintf(stderr, "bench-pager: %s\n", err.msg);
        return e == -ENOSYS || e == -EPERM ? 77 : 1;
    }
    e = moe_pager_add_file(run.p, path, o.size, &run.file, &err);
    if (e < 0) {
        fprintf(stderr, "bench-pager: %s\n", err.msg);
        return 1;
    }
    for (int i = 0; i < o.inflight; i++)
        slots[i].seg.file = run.file;
    pthread_mutex_init(&run.lock, NULL);
    pthread_cond_init(&run.cond, NULL);
    moe_pager_get_stats(run.p, &st);
    printf("pager    %d thread(s), depth %d, chunk %" PRIu64 " KiB, O_DIRECT %s, registered "
           "buffers %s, registered files %s\n",
           o.threads ? o.threads : 1, o.depth ? o.depth : 32,
           (o.chunk ? o.chunk : (uint64_t)1 << 20) >> 10,
           moe_pager_file_direct(run.p, run.file) ? "yes" : "no",
           st.buffers_registered ? "yes" : "no", st.files_registered ? "yes" : "no");

    /* 2 and 3: throughput, pager and fio alternately (the disk's speed
     * drifts), the best and the median of each. */
    for (int pass = 0; pass < passes; pass++) {
        double c0 = cpu_secs();

        pager_bw[pass] = (double)o.size / read_all(&run, slots, o.inflight, o.size, o.job);
        cpu_per_gb += (cpu_secs() - c0) / ((double)o.size * 1e-9) / passes;
        if (have_fio) {
            fio_bw[pass] = bench_fio(path, o.size, "");
            fio_reg_bw[pass] = bench_fio(path, o.size, "--fixedbufs --registerfiles");
        }
        have_fio = have_fio && fio_bw[pass] > 0 && fio_reg_bw[pass] > 0;
    }
    printf("\nthroughput: whole file as %" PRIu64 "-byte jobs, %d in flight, %d pass%s\n", o.job,
           o.inflight, passes, passes == 1 ? "" : "es");
    print_bw("pager", pager_bw, passes);
    printf("; CPU %.3f s per GB)\n", cpu_per_gb);
    if (have_fio) {
        print_bw("fio", fio_bw, passes);
        printf("; io_uring, direct, 1 MiB, QD 32)\n");
        fio_best = bench_best(fio_bw, passes);
        printf("  ratio  %6.2f       pager / fio, best (target >= 0.90); median %.2f\n",
               bench_best(pager_bw, passes) / fio_best,
               bench_median(pager_bw, passes) / bench_median(fio_bw, passes));
        /* The same with registered buffers and files, as the pager reads. */
        print_bw("fio-r", fio_reg_bw, passes);
        printf("; the same, --fixedbufs --registerfiles)\n");
        printf("  ratio  %6.2f       pager / fio-r, best; median %.2f\n",
               bench_best(pager_bw, passes) / bench_best(fio_reg_bw, passes),
               bench_median(pager_bw, passes) / bench_median(fio_reg_bw, passes));
    } else {
        printf("  fio    not found (or it failed): no ratio\n");
    }

    /* 4: one expert alone. */
    printf("\nlatency: one expert alone, nothing else in flight\n");
    for (int k = 0; k < 2; k++) {
        uint64_t bytes = lat_bytes[k];
        int reps = o.quick ? 3 : bytes == MIXTRAL_EXPERT ? 8 : 16;
        uint64_t n_pos = o.size / bytes;
        double ms[16];

        if (n_pos == 0) {
            printf("  %11" PRIu64 " B: skipped, the file is smaller\n", bytes);
            continue;
        }
        for (int i = 0; i < reps; i++) {
            struct slot s = {.buf = lat_buf, .run = &run};
            uint64_t off = ((uint64_t)i % n_pos) * bytes;

            s.seg = (struct moe_pager_seg){run.file, 0, 0, 0, lat_buf};
            s.job =
                (struct moe_pager_job){.segs = &s.seg, .n_segs = 1, .done = slot_done, .arg = &s};
            /* read_all from off: one job of `bytes` */
            run.size = off + bytes;
            run.job_bytes = bytes;
            run.next_off = off;
            run.active = 1;
            run.failed = 0;
            {
                uint64_t t0 = moe_now_ns();

                slot_submit(&s);
                run_wait(&run);
                ms[i] = secs(moe_now_ns() - t0) * 1e3;
            }
        }
        qsort(ms, (size_t)reps, sizeof(ms[0]), bench_cmp_double);
        {
            double p50 = ms[reps / 2], gbs = (double)bytes / (p50 * 1e-3) * 1e-9;

            printf("  %11" PRIu64 " B x %2d: p50 %7.1f ms, max %7.1f ms -> %5.2f GB/s", bytes, reps,
                   p50, ms[reps - 1], gbs);
            if (fio_best > 0)
                printf(", %.2f of fio", gbs / (fio_best * 1e-9));
            printf("\n");
        }
    }

    moe_pager_get_stats(run.p, &st);
    printf("\nstats    %" PRIu64 " jobs, %" PRIu64 " reads, %" PRIu64 " short, %.2f GB read\n",
           st.jobs_done, st.reads, st.short_reads, (double)st.bytes_read * 1e-9);
    moe_pager_free(run.p);
    remove_made();
    made_path = NULL;
    free(path);
    pthread_mutex_destroy(&run.lock);
    pthread_cond_destroy(&run.cond);
    return 0;
}
