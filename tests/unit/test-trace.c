/*
 * Routing traces (engine/trace.c): writer/reader round trip, recovery of an
 * unclosed file, a table of bad files, steps, Belady's MIN against an
 * exhaustive search and a plain O(n^2) MIN, and the determinism of the
 * synthetic stream.
 */
#include "tests.h"

#include "backend.h"
#include "cache.h"
#include "genmodel.h"
#include "layer.h"
#include "model.h"
#include "safetensors.h"
#include "trace.h"
#include "trace_import.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <unistd.h>

/* ---- helpers --------------------------------------------------------------------------- */

static void put16(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static void put32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

/* A trace image made by hand: L layers, E experts, top-k K, n records whose
 * layer is i % L and experts (i + j) % E. */
struct image {
    unsigned char *p;
    size_t len;
};

static size_t rec_bytes(int K)
{
    return 8 + 2 * (size_t)K;
}

static struct image make_image(int L, int E, int K, int n, uint64_t n_records)
{
    struct image im;

    im.len = 128 + (size_t)n * rec_bytes(K);
    im.p = calloc(1, im.len);
    ASSERT_TRUE(im.p);
    memcpy(im.p, "MOETRACE", 8);
    put32(im.p + 8, 1);
    put32(im.p + 12, 128);
    put32(im.p + 16, (uint32_t)L);
    put32(im.p + 20, (uint32_t)E);
    put32(im.p + 24, (uint32_t)K);
    put64(im.p + 32, 4096);
    put64(im.p + 40, n_records);
    memcpy(im.p + 48, "handmade", 8);
    for (int i = 0; i < n; i++) {
        unsigned char *r = im.p + 128 + (size_t)i * rec_bytes(K);

        put32(r, (uint32_t)i);
        put16(r + 4, (uint32_t)(i % L));
        for (int j = 0; j < K; j++)
            put16(r + 8 + 2 * j, (uint32_t)((i + j) % E));
    }
    return im;
}

static unsigned char *rec(struct image *im, int K, int i)
{
    return im->p + 128 + (size_t)i * rec_bytes(K);
}

static char *read_whole(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    char *buf;
    long n;

    ASSERT_TRUE(f);
    ASSERT_EQ(fseek(f, 0, SEEK_END), 0);
    n = ftell(f);
    ASSERT_TRUE(n >= 0);
    rewind(f);
    buf = malloc((size_t)n + 1);
    ASSERT_TRUE(buf);
    ASSERT_EQ(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return buf;
}

/* ---- round trip ------------------------------------------------------------------------ */

#define RT_THREADS 4
#define RT_PER_THREAD 3000

struct rt_arg {
    struct moe_trace_writer *w;
    int layer;
};

/* Each thread writes its own layer, tokens 0, 1, ... one or two at a time;
 * experts (t + layer + j) % E. */
static void *rt_thread(void *p)
{
    struct rt_arg *a = p;
    int32_t ids[2 * 3];

    for (int t = 0; t < RT_PER_THREAD;) {
        int n = (t % 3 == 0 && t + 2 <= RT_PER_THREAD) ? 2 : 1;

        for (int b = 0; b < n; b++)
            for (int j = 0; j < 3; j++)
                ids[b * 3 + j] = (t + b + a->layer + j) % 16;
        ASSERT_EQ(moe_trace_write(a->w, (uint32_t)t, a->layer, ids, n), 0);
        t += n;
    }
    return NULL;
}

static void test_round_trip(const char *dir)
{
    struct moe_trace_info info = {
        .n_layers = 8, .n_experts = 16, .top_k = 3, .expert_bytes = 12345};
    struct moe_trace_writer *w;
    struct moe_error err = {0};
    struct moe_trace *t;
    pthread_t th[RT_THREADS];
    struct rt_arg args[RT_THREADS];
    uint32_t next_tok[RT_THREADS] = {0};
    char path[512], *buf;
    size_t len;

    snprintf(info.model, sizeof(info.model), "unit-model");
    snprintf(path, sizeof(path), "%s/rt.trace", dir);
    ASSERT_EQ(moe_trace_writer_open(path, &info, &w, &err), 0);
    for (int i = 0; i < RT_THREADS; i++) {
        args[i].w = w;
        args[i].layer = 2 * i + 1;
        ASSERT_EQ(pthread_create(&th[i], NULL, rt_thread, &args[i]), 0);
    }
    for (int i = 0; i < RT_THREADS; i++)
        pthread_join(th[i], NULL);
    ASSERT_EQ(moe_trace_writer_close(w, &err), 0);

    ASSERT_EQ(moe_trace_read(path, &t, &err), 0);
    ASSERT_STREQ(t->info.model, "unit-model");
    ASSERT_EQ(t->info.n_layers, 8);
    ASSERT_EQ(t->info.n_experts, 16);
    ASSERT_EQ(t->info.top_k, 3);
    ASSERT_EQ(t->info.expert_bytes, 12345);
    ASSERT_EQ(t->n_records, RT_THREADS * RT_PER_THREAD);
    /* Per layer, the records come in the order their thread wrote them. */
    for (uint64_t i = 0; i < t->n_records; i++) {
        int l = t->layer[i], th_i = (l - 1) / 2;

        ASSERT_TRUE(l % 2 == 1 && th_i < RT_THREADS);
        ASSERT_EQ(t->token[i], next_tok[th_i]);
        for (int j = 0; j < 3; j++)
            ASSERT_EQ(t->expert[i * 3 + j], (t->token[i] + l + j) % 16);
        next_tok[th_i]++;
    }
    moe_trace_free(t);

    /* An unclosed file: n_records = 0, every whole record is taken. */
    buf = read_whole(path, &len);
    put64((unsigned char *)buf + 40, 0);
    ASSERT_EQ(moe_trace_parse(buf, len, "unclosed", &t, &err), 0);
    ASSERT_EQ(t->n_records, RT_THREADS * RT_PER_THREAD);
    moe_trace_free(t);
    /* ... and a partial trailing record is refused, with where it is. */
    ASSERT_EQ(moe_trace_parse(buf, len - 5, "unclosed", &t, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "unclosed: record 11999 at byte offset 168114 is incomplete");
    /* Only the header: an empty trace. */
    ASSERT_EQ(moe_trace_parse(buf, 128, "empty", &t, &err), 0);
    ASSERT_EQ(t->n_records, 0);
    moe_trace_free(t);
    free(buf);

    /* A long model name is cut to 63 bytes. */
    memset(info.model, 'x', sizeof(info.model));
    info.model[sizeof(info.model) - 1] = 0;
    ASSERT_EQ(moe_trace_writer_open(path, &info, &w, &err), 0);
    ASSERT_EQ(moe_trace_writer_close(w, &err), 0);
    ASSERT_EQ(moe_trace_read(path, &t, &err), 0);
    ASSERT_EQ(strlen(t->info.model), 63);
    ASSERT_EQ(t->n_records, 0);
    moe_trace_free(t);

    /* Missing file, directory. */
    ASSERT_EQ(moe_trace_read("/nonexistent/x.trace", &t, &err), -ENOENT);
    ASSERT_CONTAINS(err.msg, "/nonexistent/x.trace");
    ASSERT_EQ(moe_trace_read(dir, &t, &err), -EISDIR);
}

/* Bad calls and failed writes stick; close reports them; the file keeps
 * what was written before. */
static void test_writer_errors(const char *dir)
{
    struct moe_trace_info info = {.n_layers = 4, .n_experts = 8, .top_k = 2};
    struct moe_trace_writer *w;
    struct moe_error err = {0};
    struct moe_trace *t;
    static const int32_t good[4] = {0, 1, 2, 3}, dup[2] = {5, 5}, big[2] = {1, 8};
    char path[512];

    snprintf(path, sizeof(path), "%s/bad.trace", dir);
    info.top_k = 9;
    ASSERT_EQ(moe_trace_writer_open(path, &info, &w, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "top_k 9");
    info.top_k = 2;
    info.n_layers = 0;
    ASSERT_EQ(moe_trace_writer_open(path, &info, &w, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "n_layers 0");
    info.n_layers = 4;
    ASSERT_EQ(moe_trace_writer_open("/nonexistent/dir/x.trace", &info, &w, &err), -ENOENT);
    ASSERT_CONTAINS(err.msg, "cannot create");

    static const struct {
        int layer;
        const int32_t *ids;
        uint32_t first;
        int n;
        int code;
        const char *msg;
    } bad[] = {
        {4, good, 0, 1, -EINVAL, "layer 4 of 4"},
        {-1, good, 0, 1, -EINVAL, "layer -1"},
        {1, dup, 0, 1, -EINVAL, "expert 5 repeated"},
        {1, big, 0, 1, -EINVAL, "expert 8 out of range"},
        {1, good, UINT32_MAX, 2, -EOVERFLOW, "past 2^32"},
    };
    for (size_t i = 0; i < MOE_ARRAY_SIZE(bad); i++) {
        ASSERT_EQ(moe_trace_writer_open(path, &info, &w, &err), 0);
        ASSERT_EQ(moe_trace_write(w, 0, 2, good, 2), 0);
        ASSERT_EQ(moe_trace_write(w, bad[i].first, bad[i].layer, bad[i].ids, bad[i].n),
                  bad[i].code);
        /* Sticky. */
        ASSERT_EQ(moe_trace_write(w, 2, 2, good, 1), bad[i].code);
        ASSERT_EQ(moe_trace_writer_close(w, &err), bad[i].code);
        ASSERT_CONTAINS(err.msg, bad[i].msg);
        ASSERT_CONTAINS(err.msg, path);
        /* The header was never patched: readers take the whole records,
         * none here (they were still buffered). */
        ASSERT_EQ(moe_trace_read(path, &t, &err), 0);
        ASSERT_EQ(t->n_records, 0);
        moe_trace_free(t);
    }
    /* The last token number that fits. */
    ASSERT_EQ(moe_trace_writer_open(path, &info, &w, &err), 0);
    ASSERT_EQ(moe_trace_write(w, UINT32_MAX, 3, good, 1), 0);
    ASSERT_EQ(moe_trace_write(w, 7, 3, good, 0), 0);
    ASSERT_EQ(moe_trace_writer_close(w, &err), 0);
    ASSERT_EQ(moe_trace_read(path, &t, &err), 0);
    ASSERT_EQ(t->n_records, 1);
    ASSERT_EQ(t->token[0], UINT32_MAX);
    moe_trace_free(t);
    ASSERT_EQ(moe_trace_writer_close(NULL, &err), 0);

    /* A full disk: the header cannot be written. */
    if (access("/dev/full", W_OK) == 0) {
        ASSERT_EQ(moe_trace_writer_open("/dev/full", &info, &w, &err), -ENOSPC);
        ASSERT_CONTAINS(err.msg, "cannot write the header");
    }
}

/* ---- bad files ------------------------------------------------------------------------- */

enum mut {
    M_SHORT,
    M_MAGIC,
    M_VERSION,
    M_HDR_BYTES,
    M_LAYERS_0,
    M_LAYERS_BIG,
    M_EXPERTS_0,
    M_EXPERTS_BIG,
    M_TOPK_0,
    M_TOPK_OVER_E,
    M_TOPK_65,
    M_FLAGS,
    M_NAME,
    M_RESERVED,
    M_LAYER,
    M_EXPERT,
    M_DUP,
    M_REC_ZERO,
    M_TRUNC,
    M_EXTRA,
    M_PARTIAL,
    M_HUGE_N,
};

static void test_bad_files(void)
{
    /* Good: L 4, E 16, K 3, 6 records, n_records 6; record size 14. */
    static const struct {
        enum mut m;
        const char *msg;
    } cases[] = {
        {M_SHORT, "bad: 100 bytes: too short for the 128-byte trace header"},
        {M_MAGIC, "bad: bad magic"},
        {M_VERSION, "bad: version 2: expected 1"},
        {M_HDR_BYTES, "bad: header bytes 64: expected 128"},
        {M_LAYERS_0, "bad: n_layers 0: expected 1 to 1024"},
        {M_LAYERS_BIG, "n_layers 1025"},
        {M_EXPERTS_0, "bad: n_experts 0: expected 1 to 65535"},
        {M_EXPERTS_BIG, "n_experts 65536"},
        {M_TOPK_0, "bad: top_k 0: expected 1 to 16"},
        {M_TOPK_OVER_E, "bad: top_k 3: expected 1 to 2 (n_experts 2)"},
        {M_TOPK_65, "top_k 65"},
        {M_FLAGS, "bad: unknown flags 0x4"},
        {M_NAME, "bad: the model name is not NUL-terminated"},
        {M_RESERVED, "bad: header byte 120 is 7: expected 0"},
        {M_LAYER, "bad: record 2 at byte offset 156: layer 4: expected below n_layers 4"},
        {M_EXPERT, "bad: record 3 at byte offset 170: expert 16 in slot 1: expected below "
                   "n_experts 16"},
        {M_DUP, "bad: record 5 at byte offset 198: expert 6 twice (slots 1 and 2)"},
        {M_REC_ZERO, "bad: record 1 at byte offset 142: reserved field is 9"},
        {M_TRUNC, "bad: record 5 at byte offset 198 is truncated: the header says 6 records, "
                  "the file holds 5 whole ones"},
        {M_EXTRA, "bad: 3 bytes past record 5 at byte offset 212: the header says 6 records"},
        {M_PARTIAL, "bad: record 6 at byte offset 212 is incomplete: 3 of 14 bytes"},
        {M_HUGE_N, "is truncated: the header says 9223372036854775808 records"},
    };
    struct moe_error err = {0};
    struct moe_trace *t;

    {
        struct image im = make_image(4, 16, 3, 6, 6);

        ASSERT_EQ(moe_trace_parse(im.p, im.len, "good", &t, &err), 0);
        ASSERT_EQ(t->n_records, 6);
        ASSERT_STREQ(t->info.model, "handmade");
        ASSERT_EQ(t->expert[5 * 3 + 2], 7);
        moe_trace_free(t);
        free(im.p);
    }
    for (size_t i = 0; i < MOE_ARRAY_SIZE(cases); i++) {
        struct image im = make_image(4, 16, 3, 6, 6);
        size_t len = im.len;

        switch (cases[i].m) {
        case M_SHORT:
            len = 100;
            break;
        case M_MAGIC:
            im.p[3] = 'X';
            break;
        case M_VERSION:
            put32(im.p + 8, 2);
            break;
        case M_HDR_BYTES:
            put32(im.p + 12, 64);
            break;
        case M_LAYERS_0:
            put32(im.p + 16, 0);
            break;
        case M_LAYERS_BIG:
            put32(im.p + 16, 1025);
            break;
        case M_EXPERTS_0:
            put32(im.p + 20, 0);
            break;
        case M_EXPERTS_BIG:
            put32(im.p + 20, 65536);
            break;
        case M_TOPK_0:
            put32(im.p + 24, 0);
            break;
        case M_TOPK_OVER_E:
            put32(im.p + 20, 2);
            break;
        case M_TOPK_65:
            put32(im.p + 20, 1000);
            put32(im.p + 24, 65);
            break;
        case M_FLAGS:
            put32(im.p + 28, 4);
            break;
        case M_NAME:
            memset(im.p + 48, 'a', 64);
            break;
        case M_RESERVED:
            im.p[120] = 7;
            break;
        case M_LAYER:
            put16(rec(&im, 3, 2) + 4, 4);
            break;
        case M_EXPERT:
            put16(rec(&im, 3, 3) + 10, 16);
            break;
        case M_DUP:
            put16(rec(&im, 3, 5) + 12, 6);
            break;
        case M_REC_ZERO:
            put16(rec(&im, 3, 1) + 6, 9);
            break;
        case M_TRUNC:
            len -= 1;
            break;
        case M_EXTRA:
            im.p = realloc(im.p, len + 3);
            memset(im.p + len, 0, 3);
            len += 3;
            break;
        case M_PARTIAL:
            put64(im.p + 40, 0);
            im.p = realloc(im.p, len + 3);
            memset(im.p + len, 0, 3);
            len += 3;
            break;
        case M_HUGE_N:
            put64(im.p + 40, 1ull << 63);
            break;
        }
        memset(&err, 0, sizeof(err));
        t = NULL;
        if (moe_trace_parse(im.p, len, "bad", &t, &err) != -EINVAL)
            FAIL("case %zu (%s): accepted", i, cases[i].msg);
        ASSERT_TRUE(t == NULL);
        ASSERT_CONTAINS(err.msg, cases[i].msg);
        free(im.p);
    }
    /* Bytes after the name's NUL are ignored. */
    {
        struct image im = make_image(4, 16, 3, 6, 6);

        memcpy(im.p + 48, "ab\0cd", 5);
        ASSERT_EQ(moe_trace_parse(im.p, im.len, "junk", &t, &err), 0);
        ASSERT_STREQ(t->info.model, "ab");
        ASSERT_EQ(t->info.model[3], 0);
        moe_trace_free(t);
        free(im.p);
    }
    /* The largest top_k: 64 of 64 experts. */
    {
        struct image im = make_image(2, 64, 64, 3, 3);

        ASSERT_EQ(moe_trace_parse(im.p, im.len, "k64", &t, &err), 0);
        moe_trace_free(t);
        free(im.p);
    }
}

/* ---- steps ----------------------------------------------------------------------------- */

/* A trace in memory from layers and experts (top-k K). */
static struct moe_trace *mem_trace(int L, int E, int K, uint64_t n, const uint16_t *layers,
                                   const uint16_t *experts)
{
    struct moe_trace *t = calloc(1, sizeof(*t));

    ASSERT_TRUE(t);
    t->info.n_layers = L;
    t->info.n_experts = E;
    t->info.top_k = K;
    t->n_records = n;
    t->token = calloc(n + 1, sizeof(*t->token));
    t->layer = malloc((n + 1) * sizeof(*t->layer));
    t->expert = malloc((n * K + 1) * sizeof(*t->expert));
    ASSERT_TRUE(t->token && t->layer && t->expert);
    memcpy(t->layer, layers, n * sizeof(*layers));
    memcpy(t->expert, experts, n * K * sizeof(*experts));
    return t;
}

static void test_steps(void)
{
    static const uint16_t layers[] = {0, 0, 1, 1, 1, 0, 2, 2, 2, 0};
    static const struct moe_trace_step want[] = {
        {0, 2, 0}, {2, 3, 1}, {5, 1, 0}, {6, 3, 2}, {9, 1, 0},
    };
    uint16_t experts[10];
    struct moe_trace_step *s;
    struct moe_trace *t;
    uint64_t n;

    memset(experts, 0, sizeof(experts));
    t = mem_trace(3, 4, 1, 10, layers, experts);
    ASSERT_EQ(moe_trace_steps(t, &s, &n), 0);
    ASSERT_EQ(n, MOE_ARRAY_SIZE(want));
    for (uint64_t i = 0; i < n; i++) {
        ASSERT_EQ(s[i].first, want[i].first);
        ASSERT_EQ(s[i].n, want[i].n);
        ASSERT_EQ(s[i].layer, want[i].layer);
    }
    free(s);
    t->n_records = 0;
    ASSERT_EQ(moe_trace_steps(t, &s, &n), 0);
    ASSERT_EQ(n, 0);
    free(s);
    moe_trace_free(t);
}

/* ---- Belady ---------------------------------------------------------------------------- */

/* The accesses of t as cache-sim counts them: per step, distinct keys
 * (layer * E + expert) in first-seen order. */
struct accs {
    int n_steps;
    int *start; /* [n_steps + 1] */
    int *key;
};

static struct accs accesses_of(const struct moe_trace *t)
{
    struct moe_trace_step *s;
    uint64_t n;
    struct accs a;
    int K = t->info.top_k, E = t->info.n_experts, na = 0;

    ASSERT_EQ(moe_trace_steps(t, &s, &n), 0);
    a.n_steps = (int)n;
    a.start = malloc((n + 1) * sizeof(int));
    a.key = malloc((t->n_records * K + 1) * sizeof(int));
    for (uint64_t i = 0; i < n; i++) {
        a.start[i] = na;
        for (uint64_t r = s[i].first; r < s[i].first + s[i].n; r++)
            for (int j = 0; j < K; j++) {
                int key = s[i].layer * E + t->expert[r * K + j], seen = 0;

                for (int q = a.start[i]; q < na; q++)
                    seen |= a.key[q] == key;
                if (!seen)
                    a.key[na++] = key;
            }
    }
    a.start[n] = na;
    free(s);
    return a;
}

/* The plain MIN: on a miss with a full cache, scan forward for each
 * resident's next use and evict the farthest (not one of this step). */
static uint64_t naive_min(const struct accs *a, int cap)
{
    int *res = malloc((size_t)(cap + 1) * sizeof(int)), n_res = 0;
    uint64_t hits = 0;

    for (int s = 0; s < a->n_steps; s++) {
        int end = a->start[s + 1];

        for (int p = a->start[s]; p < end; p++) {
            int k = a->key[p], found = 0;

            for (int i = 0; i < n_res; i++)
                found |= res[i] == k;
            if (found) {
                hits++;
                continue;
            }
            if (n_res == cap) {
                int victim = -1, far = -1;

                for (int i = 0; i < n_res; i++) {
                    int nu = INT32_MAX, in_step = 0;

                    for (int q = a->start[s]; q < end; q++)
                        in_step |= a->key[q] == res[i];
                    if (in_step)
                        continue;
                    for (int q = end; q < a->start[a->n_steps]; q++)
                        if (a->key[q] == res[i]) {
                            nu = q;
                            break;
                        }
                    if (nu > far) {
                        far = nu;
                        victim = i;
                    }
                }
                ASSERT_TRUE(victim >= 0);
                res[victim] = res[--n_res];
            }
            res[n_res++] = k;
        }
    }
    free(res);
    return hits;
}

/* Exhaustive search: the fewest misses over every eviction choice, keys
 * < 10 as bits of a mask.  memo[s][mask]: misses from step s on. */
static int exhaustive(const struct accs *a, const int *keymap, int cap, int s, unsigned mask,
                      int *memo)
{
    unsigned need = 0, all;
    int misses = 0, best = INT32_MAX;

    if (s == a->n_steps)
        return 0;
    if (memo[s * 1024 + mask] >= 0)
        return memo[s * 1024 + mask];
    for (int p = a->start[s]; p < a->start[s + 1]; p++) {
        unsigned bit = 1u << keymap[a->key[p]];

        need |= bit;
        misses += !(mask & bit);
    }
    all = mask | need;
    /* Every subset of what is held after the step that keeps the step's
     * experts and fits. */
    for (unsigned sub = all;; sub = (sub - 1) & all) {
        if ((sub & need) == need && __builtin_popcount(sub) <= cap) {
            int m = exhaustive(a, keymap, cap, s + 1, sub, memo);

            if (m < best)
                best = m;
        }
        if (sub == 0)
            break;
    }
    memo[s * 1024 + mask] = misses + best;
    return misses + best;
}

/* A random trace: n records in runs (steps) of 1..max_run of one layer. */
static struct moe_trace *random_trace(uint64_t *seed, int L, int E, int K, int n, int max_run,
                                      double skew)
{
    uint16_t *layers = malloc((size_t)n * sizeof(*layers));
    uint16_t *experts = malloc((size_t)n * K * sizeof(*experts));
    struct moe_trace *t;
    int layer = 0;

    for (int i = 0; i < n;) {
        int run = 1 + (int)(test_rand_u64(seed) % (uint64_t)max_run);

        layer = (layer + 1 + (int)(test_rand_u64(seed) % 2)) % L;
        for (int r = 0; r < run && i < n; r++, i++) {
            layers[i] = (uint16_t)layer;
            for (int j = 0; j < K; j++) {
                uint16_t x;
                int dup;

                do {
                    double u = (double)(test_rand_u64(seed) >> 11) * 0x1p-53;

                    /* Skewed towards low ids, so that there is reuse. */
                    x = (uint16_t)((int)(pow(u, skew) * E) % E);
                    dup = 0;
                    for (int q = 0; q < j; q++)
                        dup |= experts[(size_t)i * K + q] == x;
                } while (dup);
                experts[(size_t)i * K + j] = x;
            }
        }
    }
    t = mem_trace(L, E, K, (uint64_t)n, layers, experts);
    free(layers);
    free(experts);
    return t;
}

static int max_step(const struct accs *a)
{
    int m = 0;

    for (int s = 0; s < a->n_steps; s++)
        m = MOE_MAX(m, a->start[s + 1] - a->start[s]);
    return m;
}

static int distinct_keys(const struct accs *a, int n_keys)
{
    char *seen = calloc((size_t)n_keys, 1);
    int d = 0;

    for (int p = 0; p < a->start[a->n_steps]; p++)
        if (!seen[a->key[p]]++)
            d++;
    free(seen);
    return d;
}

static void free_accs(struct accs *a)
{
    free(a->start);
    free(a->key);
}

static void test_belady_exhaustive(void)
{
    uint64_t seed = 11;
    int checked = 0;

    for (int iter = 0; iter < 400; iter++) {
        int L = 1 + (int)(test_rand_u64(&seed) % 3), E = 2 + (int)(test_rand_u64(&seed) % 3);
        int K = 1 + (int)(test_rand_u64(&seed) % 2), n = 4 + (int)(test_rand_u64(&seed) % 12);
        struct moe_trace *t;
        struct accs a;
        int keymap[16], n_keys = 0, *memo;

        if (L * E > 10)
            L = 10 / E;
        K = MOE_MIN(K, E);
        t = random_trace(&seed, L, E, K, n, 2, 1.5);
        a = accesses_of(t);
        for (int i = 0; i < L * E; i++)
            keymap[i] = n_keys++;
        memo = malloc((size_t)(a.n_steps + 1) * 1024 * sizeof(int));
        for (int cap = max_step(&a); cap <= L * E; cap++) {
            struct moe_belady_result br;
            struct moe_error err;
            int misses, total = a.start[a.n_steps];

            for (int i = 0; i < (a.n_steps + 1) * 1024; i++)
                memo[i] = -1;
            misses = exhaustive(&a, keymap, cap, 0, 0, memo);
            ASSERT_EQ(moe_trace_belady(t, (uint64_t)cap, &br, &err), 0);
            ASSERT_EQ(br.accesses, total);
            if ((int)br.hits != total - misses)
                FAIL("iter %d L %d E %d K %d n %d cap %d: belady %d hits, optimum %d", iter, L, E,
                     K, n, cap, (int)br.hits, total - misses);
            ASSERT_EQ(naive_min(&a, cap), total - misses);
            checked++;
        }
        free(memo);
        free_accs(&a);
        moe_trace_free(t);
    }
    printf("belady: optimal on %d tiny traces x capacities\n", checked);
}

static void test_belady_naive(void)
{
    uint64_t seed = 99;

    for (int iter = 0; iter < 150; iter++) {
        int L = 1 + (int)(test_rand_u64(&seed) % 6), E = 2 + (int)(test_rand_u64(&seed) % 30);
        int K = 1 + (int)(test_rand_u64(&seed) % 4), n = 50 + (int)(test_rand_u64(&seed) % 400);
        struct moe_trace *t;
        struct accs a;
        int ms, keys;

        K = MOE_MIN(K, E);
        t = random_trace(&seed, L, E, K, n, 4, 1.0 + (double)(iter % 4));
        a = accesses_of(t);
        ms = max_step(&a);
        keys = distinct_keys(&a, L * E);
        for (int cap = ms; cap <= keys + 1; cap += 1 + (keys - ms) / 7) {
            struct moe_belady_result br;
            struct moe_error err;

            ASSERT_EQ(moe_trace_belady(t, (uint64_t)cap, &br, &err), 0);
            ASSERT_EQ(br.accesses, a.start[a.n_steps]);
            ASSERT_EQ(br.hits, naive_min(&a, cap));
            if (cap >= keys)
                ASSERT_EQ(br.hits, br.accesses - (uint64_t)keys);
        }
        /* Below the largest step: refused. */
        if (ms > 1) {
            struct moe_belady_result br;
            struct moe_error err;

            ASSERT_EQ(moe_trace_belady(t, (uint64_t)ms - 1, &br, &err), -EINVAL);
            ASSERT_CONTAINS(err.msg, "distinct experts of step");
        }
        free_accs(&a);
        moe_trace_free(t);
    }
}

/* By hand: layer 0 uses a b c a d b a (experts 0 1 2 0 3 1 0), each
 * record between two of layer 1 using z (its expert 0); top-1, so every
 * record is a step: a z b z c z a z d z b z a.  Capacity 3, MIN: a z b miss;
 * c evicts b (next uses: a 6, z 5, b 10); z a z hit; d evicts c (never used
 * again); z hits; b evicts d (never again); z a hit: 7 hits of 13. */
static void test_belady_small(void)
{
    static const uint16_t layers[] = {0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0};
    static const uint16_t ex[] = {0, 0, 1, 0, 2, 0, 0, 0, 3, 0, 1, 0, 0};
    struct moe_belady_result br;
    struct moe_error err;
    struct moe_trace *t = mem_trace(2, 4, 1, 13, layers, ex);

    ASSERT_EQ(moe_trace_belady(t, 3, &br, &err), 0);
    ASSERT_EQ(br.accesses, 13);
    ASSERT_EQ(br.hits, 7);
    /* Everything fits (5 keys): only the 5 first uses miss. */
    ASSERT_EQ(moe_trace_belady(t, 5, &br, &err), 0);
    ASSERT_EQ(br.hits, 8);
    ASSERT_EQ(moe_trace_belady(t, 1000, &br, &err), 0);
    ASSERT_EQ(br.hits, 8);
    moe_trace_free(t);

    static const uint16_t one[] = {0, 0, 0, 0, 0, 0, 0};
    static const uint16_t ex1[] = {0, 1, 2, 0, 3, 1, 0};
    t = mem_trace(1, 4, 1, 7, one, ex1);
    /* One layer: all records form one step of 4 distinct experts. */
    ASSERT_EQ(moe_trace_belady(t, 4, &br, &err), 0);
    ASSERT_EQ(br.accesses, 4);
    ASSERT_EQ(br.hits, 0);
    ASSERT_EQ(moe_trace_belady(t, 3, &br, &err), -EINVAL);
    moe_trace_free(t);

    /* Empty trace, capacity 0. */
    t = mem_trace(1, 4, 1, 0, one, ex);
    ASSERT_EQ(moe_trace_belady(t, 0, &br, &err), 0);
    ASSERT_EQ(br.accesses, 0);
    moe_trace_free(t);
}

/* A few million accesses: well under a second (more under sanitizers). */
static void test_belady_speed(void)
{
    const int L = 32, E = 64, K = 8, tokens = 12000;
    uint16_t *layers = malloc((size_t)L * tokens * sizeof(*layers));
    uint16_t *ex = malloc((size_t)L * tokens * K * sizeof(*ex));
    struct moe_belady_result br;
    struct moe_error err;
    struct moe_trace *t;
    uint64_t seed = 5, t0;
    size_t n = 0;

    for (int tok = 0; tok < tokens; tok++)
        for (int l = 0; l < L; l++, n++) {
            layers[n] = (uint16_t)l;
            for (int j = 0; j < K; j++)
                ex[n * K + j] = (uint16_t)((j * (E / K)) + (int)(test_rand_u64(&seed) % (E / K)));
        }
    t = mem_trace(L, E, K, n, layers, ex);
    t0 = moe_now_ns();
    ASSERT_EQ(moe_trace_belady(t, (uint64_t)L * E / 4, &br, &err), 0);
    printf("belady: %" PRIu64 " accesses, capacity %d: hit rate %.3f in %.3f s\n", br.accesses,
           L * E / 4, (double)br.hits / (double)br.accesses, (double)(moe_now_ns() - t0) / 1e9);
    ASSERT_EQ(br.accesses, (uint64_t)L * tokens * K);
    ASSERT_TRUE((double)(moe_now_ns() - t0) / 1e9 < 20.0);
    moe_trace_free(t);
    free(layers);
    free(ex);
}

/* ---- summary and replay ------------------------------------------------------------------ */

/* LRU as the cache's acquire does it: the step's experts are held together
 * (a resident one is a hit, whatever the step pages in), each miss evicts
 * the least recently used expert not of the step, and then the step's
 * experts are the most recently used, in the step's order. */
static uint64_t naive_lru(const struct accs *a, int cap)
{
    int *res = malloc((size_t)(cap + 1) * sizeof(int)), n_res = 0; /* res[0]: LRU */
    uint64_t hits = 0;

    for (int s = 0; s < a->n_steps; s++) {
        int first = a->start[s], end = a->start[s + 1], misses = 0;

        /* Take the step's resident experts out of the order: held. */
        for (int p = first; p < end; p++) {
            int at = -1;

            for (int i = 0; i < n_res; i++)
                if (res[i] == a->key[p])
                    at = i;
            if (at < 0) {
                misses++;
                continue;
            }
            hits++;
            memmove(res + at, res + at + 1, (size_t)(n_res - at - 1) * sizeof(int));
            n_res--;
        }
        /* Room for the misses from the others, least recently used first. */
        while (n_res + (end - first) > cap) {
            ASSERT_TRUE(n_res > 0);
            memmove(res, res + 1, (size_t)(n_res - 1) * sizeof(int));
            n_res--;
        }
        ASSERT_TRUE(misses <= end - first);
        for (int p = first; p < end; p++)
            res[n_res++] = a->key[p];
    }
    free(res);
    return hits;
}

/* The trace (4 layers of 8 experts, top-2, one token a step,
 * capacity 8): at step 6, layer 2's expert 7 is resident and must not be
 * evicted to make room for expert 0 of the same step.  LRU then gets 1 hit
 * (expert 7 at step 6; cache-sim counted 0 when it evicted expert 7 for
 * expert 0 and missed it next), and so do freq and routing, which evict
 * neither layer 2 expert before step 6 either. */
static void test_replay_holds_step(void)
{
    static const uint16_t layers[] = {0, 1, 2, 3, 0, 1, 2};
    static const uint16_t experts[] = {3, 4, 0, 6, 7, 5, 6, 2, 6, 1, 2, 5, 0, 7};
    struct moe_trace *t = mem_trace(4, 8, 2, 7, layers, experts);
    struct moe_error err = {0};
    struct accs a = accesses_of(t);

    for (int p = 0; p < MOE_POLICY_COUNT; p++) {
        struct moe_cache_config cfg = {.policy = (enum moe_cache_policy)p};
        struct moe_trace_replay_result x;

        if (moe_trace_replay(t, 8, &cfg, NULL, &x, &err) < 0)
            FAIL("replay %s: %s", moe_cache_policy_name(cfg.policy), err.msg);
        ASSERT_EQ(x.accesses, 14u);
        ASSERT_EQ(x.hits, 1u);
        ASSERT_EQ(x.c.evictions, 14u - 1u - 8u);
    }
    ASSERT_EQ(naive_lru(&a, 8), 1u);
    free_accs(&a);
    moe_trace_free(t);
}

static void test_replay(void)
{
    uint64_t seed = 7;

    for (int iter = 0; iter < 60; iter++) {
        int L = 1 + (int)(test_rand_u64(&seed) % 4), E = 2 + (int)(test_rand_u64(&seed) % 20);
        int K = 1 + (int)(test_rand_u64(&seed) % 3);
        struct moe_trace *t;
        struct accs a;
        struct moe_trace_summary sum;
        int keys, ms;
        struct moe_error err = {0};

        K = MOE_MIN(K, E);
        t = random_trace(&seed, L, E, K, 300, 3, 2.0);
        a = accesses_of(t);
        keys = distinct_keys(&a, L * E);
        ms = max_step(&a);
        t->info.expert_bytes = iter % 2 ? 1000 : 0;
        ASSERT_EQ(moe_trace_summarize(t, &sum), 0);
        ASSERT_EQ(sum.n_steps, a.n_steps);
        ASSERT_EQ(sum.accesses, a.start[a.n_steps]);
        ASSERT_EQ(sum.max_step, ms);
        ASSERT_EQ(sum.distinct, keys);
        ASSERT_TRUE(sum.n_moe_layers >= 1 && sum.n_moe_layers <= L);
        for (int cap = ms; cap <= keys; cap += 1 + (keys - ms) / 4) {
            struct moe_cache_config cfg = {0};
            struct moe_trace_replay_result x;
            struct moe_belady_result br;

            ASSERT_EQ(moe_trace_belady(t, (uint64_t)cap, &br, &err), 0);
            for (int p = 0; p < MOE_POLICY_COUNT; p++)
                for (int pf = 0; pf < 2; pf++) {
                    cfg.policy = (enum moe_cache_policy)p;
                    cfg.prefetch = pf;
                    if (moe_trace_replay(t, (uint64_t)cap, &cfg, NULL, &x, &err) < 0)
                        FAIL("replay %d/%d cap %d: %s", p, pf, cap, err.msg);
                    ASSERT_EQ(x.accesses, br.accesses);
                    /* Demand paging cannot beat the optimum. */
                    if (!pf)
                        ASSERT_TRUE(x.hits <= br.hits);
                    if (!pf && cap >= keys)
                        ASSERT_EQ(x.hits, br.accesses - (uint64_t)keys);
                    if (p == MOE_POLICY_LRU && !pf)
                        ASSERT_EQ(x.hits, naive_lru(&a, cap));
                }
        }
        if (ms > 1) {
            struct moe_cache_config cfg = {0};
            struct moe_trace_replay_result x;

            ASSERT_EQ(moe_trace_replay(t, (uint64_t)ms - 1, &cfg, NULL, &x, &err), -EINVAL);
            ASSERT_CONTAINS(err.msg, "distinct experts of step");
        }
        free_accs(&a);
        moe_trace_free(t);
    }
}

/* ---- time ------------------------------------------------------------------------------ */

/* Timing of the hand-computed cases: a read holds the disk 1 s (1000 bytes
 * at 1000 B/s) and is ready 0.5 s later; a step computes for 0.25 s. */
static const struct moe_trace_timing hand_tm = {
    .disk_bw = 1000, .disk_latency = 0.5, .compute_step = 0.25, .expert_bytes = 1000};

static void replay_timed(const struct moe_trace *t, uint64_t cap,
                         const struct moe_cache_config *cfg, const struct moe_trace_timing *tm,
                         struct moe_trace_replay_result *x)
{
    struct moe_error err = {0};

    if (moe_trace_replay(t, cap, cfg, tm, x, &err) < 0)
        FAIL("replay: %s", err.msg);
}

/* Demand paging: misses queue on the one disk, hits wait for nothing. */
static void test_time_demand(void)
{
    /* Two tokens of two layers, top-1: two misses, then two hits. */
    static const uint16_t layers[] = {0, 1, 0, 1};
    static const uint16_t experts[] = {0, 1, 0, 1};
    /* One step of two experts: the second read waits for the first. */
    static const uint16_t layers2[] = {0};
    static const uint16_t experts2[] = {0, 1};
    struct moe_trace *t = mem_trace(2, 4, 1, 4, layers, experts);
    struct moe_cache_config cfg = {.policy = MOE_POLICY_LRU};
    struct moe_trace_replay_result x;
    struct moe_trace_timing tm = hand_tm;

    /* step 0: read [0, 1], ready 1.5: stall 1.5, ends 1.75; step 1: read
     * [1.75, 2.75], ready 3.25: stall 1.5, ends 3.5; steps 2, 3: hits. */
    replay_timed(t, 2, &cfg, &tm, &x);
    ASSERT_EQ(x.hits, 2);
    ASSERT_EQ(x.tokens, 2);
    ASSERT_EQ(x.bytes_read, 2000);
    ASSERT_NEAR(x.stall, 3.0, 1e-12);
    ASSERT_NEAR(x.compute, 1.0, 1e-12);
    ASSERT_EQ(x.late_hits, 0);
    /* The compute as bytes / bandwidth instead: 1000 B at 4000 B/s per step. */
    tm.compute_step = 0;
    tm.compute_bw = 4000;
    replay_timed(t, 2, &cfg, &tm, &x);
    ASSERT_NEAR(x.stall, 3.0, 1e-12);
    ASSERT_NEAR(x.compute, 1.0, 1e-12);
    /* The trace's expert bytes when the timing gives none: 500 B, 0.5 s. */
    tm = hand_tm;
    tm.expert_bytes = 0;
    t->info.expert_bytes = 500;
    replay_timed(t, 2, &cfg, &tm, &x);
    ASSERT_EQ(x.bytes_read, 1000);
    ASSERT_NEAR(x.stall, 2 * (0.5 + 0.5), 1e-12);
    moe_trace_free(t);

    t = mem_trace(1, 4, 2, 1, layers2, experts2);
    replay_timed(t, 2, &cfg, &hand_tm, &x);
    ASSERT_NEAR(x.stall, 2.5, 1e-12); /* reads [0, 1] and [1, 2], the last ready at 2.5 */
    ASSERT_EQ(x.tokens, 1);
    ASSERT_EQ(x.bytes_read, 2000);
    moe_trace_free(t);

    /* Bad timings are refused. */
    {
        struct moe_error err = {0};

        t = mem_trace(1, 4, 2, 1, layers2, experts2);
        tm = hand_tm;
        tm.disk_bw = 0;
        ASSERT_EQ(moe_trace_replay(t, 2, &cfg, &tm, &x, &err), -EINVAL);
        ASSERT_CONTAINS(err.msg, "positive bandwidth");
        tm = hand_tm;
        tm.disk_latency = -1;
        ASSERT_EQ(moe_trace_replay(t, 2, &cfg, &tm, &x, &err), -EINVAL);
        moe_trace_free(t);
    }
}

/*
 * Prefetch on the disk: a lookahead trace (two tokens, two layers, top-1)
 * whose second token's lookahead names the expert its layer 1 then uses
 * (forecast 0.5: the lookahead's prior precision).  Steps of 1 s compute:
 *   step 0  L0 e0  miss: read [0, 1], ready 1.5; stall 1.5, ends 2.5 (its
 *                  forecast, layer 1's prior of 1/4 per expert, is below
 *                  the precision wanted)
 *   step 1  L1 e1  miss: read [2.5, 3.5], ready 4.0; stall 1.5, ends 5.0
 *   step 2  L0 e0  hit, ends 6.0; lookahead e2 at layer 1: the disk is idle,
 *                  the read [5, 6] is done when step 3 starts (late 0):
 *                  prefetched, ready 6.5
 *   step 3  L1 e2  a hit on the prefetch still in flight: stall 0.5
 */
static void test_time_prefetch(void)
{
    static const uint16_t layers[] = {0, 1, 0, 1};
    static const uint16_t experts[] = {0, 1, 0, 2};
    static const uint16_t next[] = {MOE_TRACE_NO_EXPERT, MOE_TRACE_NO_EXPERT, 2,
                                    MOE_TRACE_NO_EXPERT};
    struct moe_trace *t = mem_trace(2, 4, 1, 4, layers, experts);
    struct moe_cache_config cfg = {
        .policy = MOE_POLICY_LRU, .prefetch = true, .prefetch_max = 1, .prefetch_precision = 0.4};
    struct moe_trace_timing tm = hand_tm;
    struct moe_trace_replay_result x;

    t->next = malloc(sizeof(next));
    ASSERT_TRUE(t->next);
    memcpy(t->next, next, sizeof(next));
    t->info.lookahead = true;
    tm.compute_step = 1.0;
    replay_timed(t, 4, &cfg, &tm, &x);
    ASSERT_EQ(x.c.prefetches, 1);
    ASSERT_EQ(x.c.prefetch_hits, 1);
    ASSERT_EQ(x.late_hits, 1);
    ASSERT_EQ(x.hits, 2);
    ASSERT_EQ(x.bytes_read, 3000);
    ASSERT_NEAR(x.stall, 1.5 + 1.5 + 0 + 0.5, 1e-12);

    /* Wanting a precision of 0.6, the forecast of 0.5 is not enough, however
     * idle the disk: step 3 misses, read [6, 7], stall 1.5. */
    cfg.prefetch_precision = 0.6;
    replay_timed(t, 4, &cfg, &tm, &x);
    ASSERT_EQ(x.c.prefetches, 0);
    ASSERT_NEAR(x.stall, 1.5 + 1.5 + 0 + 1.5, 1e-12);

    /*
     * Headroom: with steps of 0.25 s, step 2 starts at 3.5 and ends at 3.75;
     * the prefetch would read [3.5, 4.5], three quarters of it after step 3
     * starts (late 0.75), and every step so far but this one missed (miss
     * about 0.97): 0.5 * 0.25 < 0.5 * 0.75 * 0.97, not worth it.  Step 3
     * misses: read [3.75, 4.75], ready 5.25, stall 1.5.
     */
    cfg.prefetch_precision = 0.4;
    replay_timed(t, 4, &cfg, &hand_tm, &x);
    ASSERT_EQ(x.c.prefetches, 0);
    ASSERT_EQ(x.hits, 1);
    ASSERT_NEAR(x.stall, 1.5 + 1.5 + 0 + 1.5, 1e-12);

    /* No throttle: step 0 prefetches layer 1's e0 on its prior of 0.25 (the
     * lowest id of equal forecasts; read [1, 2]) while its own miss is
     * queued; step 1's miss then reads [2, 3], ready 3.5: stall 1.75.  The
     * unused prefetch fills the prefetch budget (a quarter of 4 experts), so
     * step 2 prefetches nothing and step 3 misses: read [4, 5], stall 1.5. */
    cfg.prefetch_precision = -1;
    replay_timed(t, 4, &cfg, &hand_tm, &x);
    ASSERT_EQ(x.c.prefetches, 1);
    ASSERT_EQ(x.c.prefetch_hits, 0);
    ASSERT_EQ(x.hits, 1);
    ASSERT_NEAR(x.stall, 1.5 + 1.5 + 0 + 1.5 + 0.25, 1e-12);
    moe_trace_free(t);
}

/*
 * The headroom rule over a run of steps: layer 0's expert e is followed by
 * layer 1's e + 1 (learned, so forecast near 1), 2 of 8 experts resident, a
 * read 1 s.  With steps of 2 s compute, a prefetch issued at layer 0 is done
 * before layer 1 starts: every layer-1 miss becomes a prefetch hit and
 * stalls less than without prefetch.  With steps of 0.01 s, the prefetch
 * would hold the disk nearly all of layer 1's wait: it saves next to nothing
 * and the throttle leaves it.  Throttled, it never stalls more than without
 * prefetch or than prefetching everything.
 */
static void test_time_headroom(void)
{
    enum { N = 400 };
    uint16_t layers[2 * N], experts[2 * N];
    uint64_t seed = 3;
    struct moe_trace *t;
    struct moe_cache_config none = {.policy = MOE_POLICY_LRU};
    struct moe_cache_config thr = {.policy = MOE_POLICY_LRU, .prefetch = true, .prefetch_max = 1};
    struct moe_cache_config all = thr;
    struct moe_trace_timing tm = hand_tm;
    struct moe_trace_replay_result xn, xt, xa;

    all.prefetch_precision = -1;
    for (int i = 0; i < N; i++) {
        int e = (int)(test_rand_u64(&seed) % 8);

        layers[2 * i] = 0;
        layers[2 * i + 1] = 1;
        experts[2 * i] = (uint16_t)e;
        experts[2 * i + 1] = (uint16_t)((e + 1) % 8);
    }
    t = mem_trace(2, 8, 1, 2 * N, layers, experts);
    tm.disk_latency = 0;
    tm.compute_step = 2.0;
    replay_timed(t, 4, &none, &tm, &xn);
    replay_timed(t, 4, &thr, &tm, &xt);
    replay_timed(t, 4, &all, &tm, &xa);
    printf("headroom, 2 s steps: stall %.1f s without prefetch, %.1f throttled (%" PRIu64
           " prefetches, %" PRIu64 " used), %.1f unthrottled\n",
           xn.stall, xt.stall, xt.c.prefetches, xt.c.prefetch_hits, xa.stall);
    ASSERT_TRUE(xt.c.prefetch_hits > N / 2); /* the rest were resident already */
    ASSERT_TRUE(xt.c.wasted_prefetches <= xt.c.prefetch_hits);
    ASSERT_TRUE(xt.stall < xn.stall * 0.7);
    ASSERT_TRUE(xt.stall <= xa.stall);

    tm.compute_step = 0.01;
    replay_timed(t, 4, &none, &tm, &xn);
    replay_timed(t, 4, &thr, &tm, &xt);
    replay_timed(t, 4, &all, &tm, &xa);
    printf("headroom, 0.01 s steps: stall %.1f s without prefetch, %.1f throttled (%" PRIu64
           " prefetches), %.1f unthrottled\n",
           xn.stall, xt.stall, xt.c.prefetches, xa.stall);
    ASSERT_TRUE(xt.c.wasted_prefetches <= xt.c.prefetch_hits);
    ASSERT_TRUE(xt.stall <= xn.stall);
    ASSERT_TRUE(xt.stall <= xa.stall);
    moe_trace_free(t);
}

/* ---- adaptive policy ------------------------------------------------------------------- */

enum adv_kind { ADV_RECENCY, ADV_FREQUENCY, ADV_SCAN, ADV_HOTSCAN, ADV_MIXED, ADV_KINDS };
static const char *const adv_names[ADV_KINDS] = {"recency", "frequency", "scan", "hot+scan",
                                                 "mixed"};

enum { ADV_L = 8, ADV_E = 64, ADV_K = 2, ADV_TOKENS = 2000 };

/*
 * Adversarial routing, per layer, top-2 of 64 experts:
 *   recency    an LRU stack of the experts; each pick takes the expert at a
 *              geometric depth (p 0.15) and moves it to the top: recency
 *              predicts, frequency does not;
 *   frequency  fixed popularity (weights 1 / (rank + 1)), independent draws;
 *   scan       the experts in a cycle larger than any cache below 100%;
 *   hot+scan   one of 8 hot experts, and one from a cycle over the rest,
 *              which flushes LRU's hot set;
 *   mixed      250 tokens of recency, 250 of hot+scan, alternating.
 */
static struct moe_trace *adv_trace(enum adv_kind kind, uint64_t seed)
{
    const uint64_t n = (uint64_t)ADV_L * ADV_TOKENS;
    uint16_t *layers = malloc(n * sizeof(*layers)), *experts = malloc(n * ADV_K * sizeof(*experts));
    int stack[ADV_L][ADV_E], perm[ADV_L][ADV_E];
    double wsum = 0;
    struct moe_trace *t;

    ASSERT_TRUE(layers && experts);
    for (int x = 0; x < ADV_E; x++)
        wsum += 1.0 / (x + 1);
    for (int l = 0; l < ADV_L; l++) {
        for (int x = 0; x < ADV_E; x++)
            perm[l][x] = stack[l][x] = x;
        for (int x = ADV_E - 1; x > 0; x--) {
            int y = (int)(test_rand_u64(&seed) % (uint64_t)(x + 1)), v = perm[l][x];

            perm[l][x] = perm[l][y];
            perm[l][y] = v;
        }
    }
    for (int tok = 0; tok < ADV_TOKENS; tok++) {
        enum adv_kind k = kind;

        if (k == ADV_MIXED)
            k = (tok / 250) % 2 == 0 ? ADV_RECENCY : ADV_HOTSCAN;
        for (int l = 0; l < ADV_L; l++) {
            uint64_t i = (uint64_t)tok * ADV_L + l;
            uint16_t *ex = experts + i * ADV_K;

            layers[i] = (uint16_t)l;
            for (int j = 0; j < ADV_K; j++) {
                int x;

                do {
                    if (k == ADV_RECENCY) {
                        int d = 0;

                        while (d < ADV_E - 1 && test_rand_u64(&seed) % 100 >= 15)
                            d++;
                        x = stack[l][d];
                    } else if (k == ADV_FREQUENCY) {
                        double u = (double)(test_rand_u64(&seed) >> 11) * 0x1p-53 * wsum;
                        int r = 0;

                        while (r < ADV_E - 1 && (u -= 1.0 / (r + 1)) > 0)
                            r++;
                        x = perm[l][r];
                    } else if (k == ADV_SCAN) {
                        x = (tok * ADV_K + j) % ADV_E;
                    } else {
                        x = j == 0 ? perm[l][test_rand_u64(&seed) % 8]
                                   : perm[l][8 + tok % (ADV_E - 8)];
                    }
                } while (j == 1 && x == ex[0]);
                ex[j] = (uint16_t)x;
            }
            /* the stack's top: the experts just used */
            for (int j = ADV_K - 1; j >= 0; j--) {
                int d = 0;

                while (stack[l][d] != ex[j])
                    d++;
                memmove(&stack[l][1], &stack[l][0], (size_t)d * sizeof(int));
                stack[l][0] = ex[j];
            }
        }
    }
    t = mem_trace(ADV_L, ADV_E, ADV_K, n, layers, experts);
    free(layers);
    free(experts);
    return t;
}

/*
 * The adaptive policy against lru and routing on the adversarial traces at
 * 10, 25, 50 and 75% of the experts: never below lru (within 0.1% of the
 * accesses: it follows lru only once lru's shadow is ahead, and its cache
 * then differs a little from lru's), and within 0.5% of routing where
 * routing is ahead of lru, so it keeps routing's gains.
 */
static void test_adaptive(void)
{
    static const int pct[] = {10, 25, 50, 75};

    for (int k = 0; k < ADV_KINDS; k++) {
        struct moe_trace *t = adv_trace((enum adv_kind)k, 7 + (uint64_t)k);

        for (size_t i = 0; i < MOE_ARRAY_SIZE(pct); i++) {
            const uint64_t cap = (uint64_t)ADV_L * ADV_E * pct[i] / 100;
            struct moe_cache_config cfg = {0};
            struct moe_trace_replay_result lru, rt, ad;
            double tol;

            cfg.policy = MOE_POLICY_LRU;
            replay_timed(t, cap, &cfg, NULL, &lru);
            cfg.policy = MOE_POLICY_ROUTING;
            replay_timed(t, cap, &cfg, NULL, &rt);
            cfg.policy = MOE_POLICY_ADAPTIVE;
            replay_timed(t, cap, &cfg, NULL, &ad);
            tol = (double)lru.accesses / 1000;
            printf("adaptive: %-9s %2d%%: lru %5.1f%%, routing %5.1f%%, adaptive %5.1f%%\n",
                   adv_names[k], pct[i], 100.0 * (double)lru.hits / (double)lru.accesses,
                   100.0 * (double)rt.hits / (double)rt.accesses,
                   100.0 * (double)ad.hits / (double)ad.accesses);
            if ((double)ad.hits < (double)lru.hits - tol)
                FAIL("%s at %d%%: adaptive %" PRIu64 " hits, below lru's %" PRIu64, adv_names[k],
                     pct[i], ad.hits, lru.hits);
            if (rt.hits > lru.hits && (double)ad.hits < (double)rt.hits - 5 * tol)
                FAIL("%s at %d%%: adaptive %" PRIu64 " hits, well below routing's %" PRIu64,
                     adv_names[k], pct[i], ad.hits, rt.hits);
        }
        moe_trace_free(t);
    }
}

/* ---- import ---------------------------------------------------------------------------- */

static struct moe_trace *import_ok(const char *text, enum moe_trace_import_format fmt,
                                   const struct moe_trace_info *info, const bool *is_moe)
{
    struct moe_error err = {0};
    struct moe_trace *t = NULL;

    if (moe_trace_import(text, strlen(text), fmt, info, is_moe, "in", &t, &err) < 0)
        FAIL("import of '%s': %s", text, err.msg);
    return t;
}

static void test_import(void)
{
    static const bool is_moe[3] = {true, false, true};
    struct moe_trace_info info = {.model = "m",
                                  .n_layers = 3,
                                  .n_experts = 8,
                                  .top_k = 2,
                                  .expert_bytes = 1000,
                                  .lookahead = true};
    static const char *csv = "layer,token,experts,weights\n"
                             "0,0,\"[1, 2]\",\"0.6 0.4\"\n"
                             "# a comment\n"
                             "\n"
                             "2,0,3;0,0.5;0.5\r\n"
                             "0,1,1 2\n"
                             "2,1,7|6";
    static const char *jsonl =
        "{\"layer\": 0, \"token\": 0, \"experts\": [1, 2], \"weights\": "
        "[0.6, 0.4]}\n"
        "\n"
        "{\"token\": 0, \"layer\": 2, \"experts\": [3, 0], \"src\": \"x\"}\n"
        "{\"layer\": 0, \"token\": 1, \"experts\": [1, 2]}\n"
        "{\"layer\": 2, \"token\": 1, \"experts\": [7, 6], \"weights\": null}\n";
    static const uint16_t want_layer[] = {0, 2, 0, 2};
    static const uint16_t want_exp[] = {1, 2, 3, 0, 1, 2, 7, 6};
    static const uint32_t want_tok[] = {0, 0, 1, 1};
    /* Bad inputs: each refused with its line and what is wrong. */
    static const struct {
        enum moe_trace_import_format fmt;
        const char *text, *msg;
    } bad[] = {
        {MOE_TRACE_IMPORT_CSV, "0,0,1 2\n3,0,1 2\n", "in:2: layer 3: expected 0 to 2"},
        {MOE_TRACE_IMPORT_CSV, "0,0,1 2\n1,0,1 2\n", "in:2: layer 1 is a dense layer"},
        {MOE_TRACE_IMPORT_CSV, "0,0,1 8\n", "in:1: expert 8 (slot 1): expected 0 to 7"},
        {MOE_TRACE_IMPORT_CSV, "0,0,1 1\n", "in:1: expert 1 twice (slots 0 and 1)"},
        {MOE_TRACE_IMPORT_CSV, "0,0,1 2 3\n", "in:1: 3 experts: expected top_k = 2"},
        {MOE_TRACE_IMPORT_CSV, "0,0,1\n", "in:1: 1 experts: expected top_k = 2"},
        {MOE_TRACE_IMPORT_CSV, "0,0,1 2,0.5\n", "in:1: 1 weights: expected top_k = 2"},
        {MOE_TRACE_IMPORT_CSV, "0,0,1 2,0.5 nan\n", "in:1: weights '0.5 nan'"},
        {MOE_TRACE_IMPORT_CSV, "0,-1,1 2\n", "in:1: token -1: expected 0 to 4294967295"},
        {MOE_TRACE_IMPORT_CSV, "0,4294967296,1 2\n", "in:1: token 4294967296"},
        {MOE_TRACE_IMPORT_CSV, "0,0,1 2\nx,0,1 2\n", "in:2: layer 'x': expected an integer"},
        {MOE_TRACE_IMPORT_CSV, "0,t,1 2\n", "in:1: token 't': expected an integer"},
        {MOE_TRACE_IMPORT_CSV, "0,0,1 a\n", "in:1: experts '1 a'"},
        {MOE_TRACE_IMPORT_CSV, "0,0\n", "in:1: expected layer,token,experts[,weights]"},
        {MOE_TRACE_IMPORT_CSV, "0,0,\"1 2\n", "unclosed quote"},
        {MOE_TRACE_IMPORT_CSV, "0,0,1 2,1 1,9\n", "too many fields"},
        {MOE_TRACE_IMPORT_JSONL, "{\"layer\": 0, \"token\": 0, \"experts\": [1, 2]}\n[1]\n",
         "in:2: expected a JSON object per line"},
        {MOE_TRACE_IMPORT_JSONL, "{\"layer\": 0, \"token\": 0, \"experts\": [1, 2]\n", "in:1:"},
        {MOE_TRACE_IMPORT_JSONL, "{\"layer\": \"0\", \"token\": 0, \"experts\": [1, 2]}\n",
         "in:1: expected integer \"layer\" and \"token\""},
        {MOE_TRACE_IMPORT_JSONL, "{\"layer\": 0, \"token\": 0, \"experts\": [1, 2.5]}\n",
         "in:1: \"experts\"[1]: expected an integer"},
        {MOE_TRACE_IMPORT_JSONL, "{\"layer\": 0, \"token\": 0, \"experts\": 3}\n",
         "in:1: \"experts\": expected an array"},
        {MOE_TRACE_IMPORT_JSONL,
         "{\"layer\": 0, \"token\": 0, \"experts\": [1, 2], \"weights\": [1, \"a\"]}\n",
         "in:1: \"weights\"[1]: expected a finite number"},
        {MOE_TRACE_IMPORT_JSONL, "{\"layer\": 2, \"token\": 0, \"experts\": [9, 2]}\n",
         "in:1: expert 9 (slot 0)"},
        {MOE_TRACE_IMPORT_JSONL, "{\"layer\": 0, \"layer\": 0, \"token\": 0, \"experts\": [1, 2]}",
         "in:1:"},
    };
    enum moe_trace_import_format fmt;

    for (int f = 0; f < 2; f++) {
        struct moe_trace *t = import_ok(
            f ? jsonl : csv, f ? MOE_TRACE_IMPORT_JSONL : MOE_TRACE_IMPORT_CSV, &info, is_moe);

        ASSERT_EQ(t->n_records, 4);
        ASSERT_TRUE(!t->info.lookahead && !t->next);
        ASSERT_STREQ(t->info.model, "m");
        ASSERT_EQ(t->info.expert_bytes, 1000);
        for (int i = 0; i < 4; i++) {
            ASSERT_EQ(t->layer[i], want_layer[i]);
            ASSERT_EQ(t->token[i], want_tok[i]);
            ASSERT_EQ(t->expert[2 * i], want_exp[2 * i]);
            ASSERT_EQ(t->expert[2 * i + 1], want_exp[2 * i + 1]);
        }
        moe_trace_free(t);
    }
    for (size_t i = 0; i < MOE_ARRAY_SIZE(bad); i++) {
        struct moe_error err = {0};
        struct moe_trace *t = NULL;

        if (moe_trace_import(bad[i].text, strlen(bad[i].text), bad[i].fmt, &info, is_moe, "in", &t,
                             &err) != -EINVAL)
            FAIL("bad input %zu ('%s') was accepted", i, bad[i].text);
        ASSERT_CONTAINS(err.msg, bad[i].msg);
        ASSERT_TRUE(t == NULL);
    }
    /* A header only on the first line; every layer is MoE without is_moe. */
    {
        struct moe_error err = {0};
        struct moe_trace *t = NULL;

        ASSERT_EQ(moe_trace_import("0,0,1 2\nlayer,token,experts\n", 28, MOE_TRACE_IMPORT_CSV,
                                   &info, NULL, "in", &t, &err),
                  -EINVAL);
        ASSERT_CONTAINS(err.msg, "in:2: layer 'layer'");
        t = import_ok("1,5,0 7\n", MOE_TRACE_IMPORT_CSV, &info, NULL);
        ASSERT_EQ(t->n_records, 1);
        moe_trace_free(t);
        t = import_ok("", MOE_TRACE_IMPORT_CSV, &info, NULL);
        ASSERT_EQ(t->n_records, 0);
        moe_trace_free(t);
    }
    ASSERT_EQ(moe_trace_import_format_parse("csv", &fmt), 0);
    ASSERT_EQ(fmt, MOE_TRACE_IMPORT_CSV);
    ASSERT_EQ(moe_trace_import_format_parse("jsonl", &fmt), 0);
    ASSERT_EQ(fmt, MOE_TRACE_IMPORT_JSONL);
    ASSERT_EQ(moe_trace_import_format_parse("json", &fmt), -EINVAL);
}

/* ---- the synthetic stream ---------------------------------------------------------------- */

static int gen(const char *model_dir, const char *path, int tokens, uint64_t seed, int batch)
{
    struct moe_cpu_config cpu = {.n_threads = 1};
    struct moe_error err = {0};
    struct moe_model *m;
    struct moe_backend *b;
    struct moe_engine *e;
    struct moe_trace_writer *w;
    struct moe_trace_info info;

    ASSERT_EQ(moe_model_open(model_dir, &m, &err), 0);
    ASSERT_EQ(moe_backend_cpu_init(&cpu, &b, &err), 0);
    ASSERT_EQ(moe_engine_init(m, b, &e), 0);
    moe_trace_info_from_model(m, "gen-test", &info);
    ASSERT_EQ(moe_trace_writer_open(path, &info, &w, &err), 0);
    if (moe_trace_generate(e, m, tokens, seed, batch, w, &err) < 0)
        FAIL("%s", err.msg);
    ASSERT_EQ(moe_trace_writer_close(w, &err), 0);
    moe_engine_free(e);
    moe_backend_free(b);
    moe_model_free(m);
    return 0;
}

static void test_generate(const char *dir)
{
    struct moe_genmodel_opts o;
    struct moe_error err = {0};
    struct moe_trace *t, *t1;
    char model[512], p1[512], p2[512], p3[512], p4[512], *a, *b;
    size_t la, lb;
    const int T = 120;

    snprintf(model, sizeof(model), "%s/model", dir);
    moe_genmodel_defaults(MOE_ARCH_DEEPSEEK_V3, &o);
    o.out_dir = model;
    o.n_layers = 6;
    o.n_experts = 32;
    o.top_k = 4;
    o.hidden = 128;
    o.ffn = 16;
    o.seed = 3;
    if (moe_genmodel_write(&o, &err) < 0)
        FAIL("genmodel: %s", err.msg);
    snprintf(p1, sizeof(p1), "%s/g1.trace", dir);
    snprintf(p2, sizeof(p2), "%s/g2.trace", dir);
    snprintf(p3, sizeof(p3), "%s/g3.trace", dir);
    snprintf(p4, sizeof(p4), "%s/g4.trace", dir);
    gen(model, p1, T, 42, 1);
    gen(model, p2, T, 42, 1);
    gen(model, p3, T, 43, 1);
    gen(model, p4, T, 42, 4);

    /* Same seed: the same bytes. */
    a = read_whole(p1, &la);
    b = read_whole(p2, &lb);
    ASSERT_EQ(la, lb);
    ASSERT_TRUE(memcmp(a, b, la) == 0);
    free(b);
    /* Another seed: another trace of the same shape. */
    b = read_whole(p3, &lb);
    ASSERT_EQ(la, lb);
    ASSERT_TRUE(memcmp(a, b, la) != 0);
    free(b);
    free(a);

    ASSERT_EQ(moe_trace_read(p1, &t, &err), 0);
    ASSERT_STREQ(t->info.model, "gen-test");
    ASSERT_EQ(t->info.n_layers, 6);
    ASSERT_EQ(t->info.top_k, 4);
    ASSERT_TRUE(t->info.expert_bytes > 0);
    {
        struct moe_model *m;
        int n_moe, k = 4, E = 32, reuse = 0, pairs = 0, used_min = E, used_max = 0;

        ASSERT_EQ(moe_model_open(model, &m, &err), 0);
        n_moe = m->n_moe_layers;
        /* Decode order: token by token, every MoE layer in order. */
        ASSERT_EQ(t->n_records, (uint64_t)T * n_moe);
        for (uint64_t i = 0; i < t->n_records; i++) {
            ASSERT_EQ(t->token[i], i / n_moe);
            ASSERT_TRUE(m->layers[t->layer[i]].is_moe);
            if (i % n_moe)
                ASSERT_TRUE(t->layer[i] > t->layer[i - 1]);
        }
        /* Neither uniform nor collapsed: most experts are used at every
         * layer, and consecutive tokens share experts more often than
         * independent picks would (k / E). */
        for (int l = 0; l < 6; l++) {
            int used[32] = {0}, n_used = 0;

            if (!m->layers[l].is_moe)
                continue;
            for (uint64_t i = 0; i < t->n_records; i++)
                if (t->layer[i] == l) {
                    for (int j = 0; j < k; j++)
                        n_used += !used[t->expert[i * k + j]]++;
                    if (i >= (uint64_t)n_moe) {
                        const uint16_t *prev = t->expert + (i - n_moe) * k;

                        for (int j = 0; j < k; j++)
                            for (int q = 0; q < k; q++)
                                reuse += prev[q] == t->expert[i * k + j];
                        pairs += k;
                    }
                }
            used_min = MOE_MIN(used_min, n_used);
            used_max = MOE_MAX(used_max, n_used);
        }
        printf("generate: experts used per layer %d to %d of %d; consecutive-token reuse %.2f "
               "(independent: %.2f)\n",
               used_min, used_max, E, (double)reuse / pairs, (double)k / E);
        ASSERT_TRUE(used_min >= 2 * k);
        ASSERT_TRUE((double)reuse / pairs > 1.5 * k / E);
        moe_model_free(m);
    }

    /* Batches of 4: the same tokens' states, records grouped per batch. */
    ASSERT_EQ(moe_trace_read(p4, &t1, &err), 0);
    ASSERT_EQ(t1->n_records, t->n_records);
    {
        uint64_t same = 0, n = 0;

        for (uint64_t i = 0; i < t1->n_records; i++)
            for (uint64_t q = 0; q < t->n_records; q++)
                if (t->token[q] == t1->token[i] && t->layer[q] == t1->layer[i]) {
                    same += memcmp(t->expert + q * 4, t1->expert + i * 4, 8) == 0;
                    n++;
                    break;
                }
        ASSERT_EQ(n, t->n_records);
        /* Only a kernel's rounding in a near tie can tell them apart. */
        ASSERT_TRUE(same >= n * 98 / 100);
        ASSERT_EQ(t1->token[0], 0);
        ASSERT_EQ(t1->token[1], 1);
    }
    moe_trace_free(t1);
    moe_trace_free(t);
}

/* Lookahead records: round trip, "none" rows, and what the parser and the
 * writer refuse. */
static void test_lookahead(const char *dir)
{
    struct moe_trace_info info = {.n_layers = 3, .n_experts = 8, .top_k = 2, .lookahead = true};
    struct moe_trace_writer *w;
    struct moe_error err = {0};
    struct moe_trace *t;
    int32_t ids[4] = {1, 2, 3, 4}, next[4] = {5, 6, 7, 0}, bad_next[2] = {5, 5};
    char path[512], *buf;
    size_t len;

    snprintf(path, sizeof(path), "%s/la.trace", dir);
    ASSERT_EQ(moe_trace_writer_open(path, &info, &w, &err), 0);
    ASSERT_EQ(moe_trace_write_ahead(w, 0, 0, ids, next, 2), 0);
    ASSERT_EQ(moe_trace_write_ahead(w, 0, 1, ids, NULL, 2), 0);
    ASSERT_EQ(moe_trace_writer_close(w, &err), 0);
    ASSERT_EQ(moe_trace_read(path, &t, &err), 0);
    ASSERT_TRUE(t->info.lookahead && t->next);
    ASSERT_EQ(t->n_records, 4u);
    ASSERT_EQ(t->next[0], 5);
    ASSERT_EQ(t->next[3], 0);
    ASSERT_EQ(t->next[4], MOE_TRACE_NO_EXPERT);
    ASSERT_EQ(t->next[7], MOE_TRACE_NO_EXPERT);
    moe_trace_free(t);

    /* record 0's lookahead at byte 128 + 8 + 4: half "none", then a repeat */
    ASSERT_EQ(moe_read_file(path, 1 << 20, &buf, &len, &err), 0);
    ASSERT_EQ(len, 128u + 4 * 16);
    buf[128 + 12] = (char)0xff;
    buf[128 + 13] = (char)0xff;
    ASSERT_EQ(moe_trace_parse(buf, len, "la", &t, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "record 0 at byte offset 128: lookahead experts");
    buf[128 + 12] = 6;
    buf[128 + 13] = 0;
    ASSERT_EQ(moe_trace_parse(buf, len, "la", &t, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "distinct");
    buf[128 + 12] = 9;
    ASSERT_EQ(moe_trace_parse(buf, len, "la", &t, &err), -EINVAL);
    /* Without the flag, the same bytes are records of another size. */
    buf[128 + 12] = 5;
    buf[28] = 0;
    ASSERT_EQ(moe_trace_parse(buf, len, "la", &t, &err), -EINVAL);
    free(buf);

    /* A bad lookahead row is a bad call that writes nothing. */
    ASSERT_EQ(moe_trace_writer_open(path, &info, &w, &err), 0);
    ASSERT_EQ(moe_trace_write_ahead(w, 0, 0, ids, bad_next, 1), -EINVAL);
    ASSERT_EQ(moe_trace_writer_close(w, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "lookahead slot 1");
}

int main(void)
{
    char *dir = test_tmpdir("trace");

    test_lookahead(dir);

    test_round_trip(dir);
    test_writer_errors(dir);
    test_bad_files();
    test_steps();
    test_belady_small();
    test_belady_exhaustive();
    test_belady_naive();
    test_belady_speed();
    test_replay();
    test_replay_holds_step();
    test_time_demand();
    test_time_prefetch();
    test_time_headroom();
    test_adaptive();
    test_import();
    test_generate(dir);
    test_rmtree(dir);
    free(dir);
    printf("PASS\n");
    return 0;
}
