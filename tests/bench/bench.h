/*
 * What the benchmarks share: the best and the median of several passes, and
 * fio's read bandwidth on a file (the disk limit a page-in benchmark is
 * compared with, measured in the same run).
 */
#ifndef MOED_TESTS_BENCH_H
#define MOED_TESTS_BENCH_H

#include "common.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BENCH_MAX_PASSES 16

static inline int bench_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return x < y ? -1 : x > y;
}

static inline double bench_best(const double *v, int n)
{
    double b = 0;

    for (int i = 0; i < n; i++)
        b = MOE_MAX(b, v[i]);
    return b;
}

static inline double bench_median(const double *v, int n)
{
    double s[BENCH_MAX_PASSES];

    memcpy(s, v, (size_t)n * sizeof(*s));
    qsort(s, (size_t)n, sizeof(*s), bench_cmp_double);
    return s[n / 2];
}

/*
 * fio's sequential read bandwidth in bytes/s over the first size bytes of
 * path (io_uring, O_DIRECT, 1 MiB blocks, queue depth 32; extra: more fio
 * options), or 0 without fio.
 */
static inline double bench_fio(const char *path, uint64_t size, const char *extra)
{
    char cmd[4352], *out = NULL;
    size_t len = 0, cap = 0;
    json_error_t jerr;
    json_t *root, *bw;
    double v = 0;
    FILE *f;

    if (strchr(path, '\'') || system("command -v fio >/dev/null 2>&1") != 0)
        return 0;
    snprintf(cmd, sizeof(cmd),
             "fio --name=seqread --filename='%s' --rw=read --ioengine=io_uring --direct=1 "
             "--bs=1M --iodepth=32 --size=%" PRIu64 " %s --output-format=json 2>/dev/null",
             path, size, extra);
    f = popen(cmd, "r");
    if (!f)
        return 0;
    for (;;) {
        size_t n;

        if (len + 4096 + 1 > cap) {
            cap = cap ? 2 * cap : 65536;
            out = realloc(out, cap);
            if (!out)
                exit(1);
        }
        n = fread(out + len, 1, cap - len - 1, f);
        if (n == 0)
            break;
        len += n;
    }
    pclose(f);
    if (!out)
        return 0;
    out[len] = 0;
    /* fio may print notes before the JSON */
    root = strchr(out, '{') ? json_loads(strchr(out, '{'), JSON_DISABLE_EOF_CHECK, &jerr) : NULL;
    bw = json_object_get(json_object_get(json_array_get(json_object_get(root, "jobs"), 0), "read"),
                         "bw_bytes");
    if (json_is_number(bw))
        v = json_number_value(bw);
    else
        fprintf(stderr, "bench: cannot find read.bw_bytes in fio's output\n");
    json_decref(root);
    free(out);
    return v;
}

#endif
