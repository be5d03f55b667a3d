/*
 * Routing traces' file format (trace.h): the writer, the parser and replay
 * steps.  The format only: the engine writes traces with it (layer.c), the
 * tools (trace.c) read them with it, and it uses neither.
 *
 * Writer: records go to a buffer of TRACE_BUF_BYTES flushed with write(2);
 * w->lock guards the buffer, the record count and the error.  The first
 * failure (a write error or a bad call) sticks: later writes return it at
 * once and close reports it.  Close flushes and patches n_records; a file
 * whose writer never closed keeps n_records = 0, and readers take every
 * whole record.
 *
 * Parser: works on the whole file image, checks every field of the header
 * and of every record before handing out anything.
 */
#include "trace.h"

#include "layer.h"
#include "model.h"
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define TRACE_BUF_BYTES (1u << 20)
#define TRACE_OFF_N_RECORDS 40
#define TRACE_OFF_MODEL 48
#define TRACE_OFF_RESERVED 112

static void put_u16(unsigned char *p, uint16_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static void put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint16_t get_u16(const unsigned char *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static uint32_t get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get_u64(const unsigned char *p)
{
    return (uint64_t)get_u32(p) | (uint64_t)get_u32(p + 4) << 32;
}

/* Bytes of one record. */
static size_t record_bytes(int top_k, bool lookahead)
{
    return 8 + (lookahead ? 4 : 2) * (size_t)top_k;
}

/* Checks the shape fields of info; 0 or -EINVAL with err. */
static int check_info(const char *what, int n_layers, int n_experts, int top_k,
                      struct moe_error *err)
{
    if (n_layers < 1 || n_layers > MOE_TRACE_MAX_LAYERS)
        return moe_error_set(err, -EINVAL, "%s: n_layers %d: expected 1 to %d", what, n_layers,
                             MOE_TRACE_MAX_LAYERS);
    if (n_experts < 1 || n_experts > MOE_TRACE_MAX_EXPERTS)
        return moe_error_set(err, -EINVAL, "%s: n_experts %d: expected 1 to %d", what, n_experts,
                             MOE_TRACE_MAX_EXPERTS);
    if (top_k < 1 || top_k > MOE_MIN(MOE_TRACE_MAX_TOPK, n_experts))
        return moe_error_set(err, -EINVAL, "%s: top_k %d: expected 1 to %d (n_experts %d)", what,
                             top_k, MOE_MIN(MOE_TRACE_MAX_TOPK, n_experts), n_experts);
    return 0;
}

/* ---- writer ---------------------------------------------------------------------------- */

struct moe_trace_writer {
    pthread_mutex_t lock;
    int fd;
    char *path;                 /* owned, for messages */
    struct moe_trace_info info; /* as written in the header */
    unsigned char *buf;         /* [TRACE_BUF_BYTES]; guarded by lock */
    size_t len;                 /* bytes in buf; guarded by lock */
    uint64_t n_records;         /* records appended; guarded by lock */
    int error;                  /* first failure, sticky; guarded by lock */
    char error_msg[256];        /* what it was; guarded by lock */
    uint64_t limit;             /* records at most, 0: none; guarded by lock */
    bool full;                  /* a call was dropped at the limit; guarded by lock */
};

/* Writes all of len bytes at the file position; 0 or -errno. */
static int write_all(int fd, const unsigned char *p, size_t len)
{
    while (len) {
        ssize_t n = write(fd, p, len);

        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Records the first failure.  Called with w->lock held. */
static int fail_locked(struct moe_trace_writer *w, int code, const char *what)
{
    if (!w->error) {
        w->error = code;
        snprintf(w->error_msg, sizeof(w->error_msg), "%s", what);
    }
    return w->error;
}

/* Writes the buffer out.  Called with w->lock held. */
static int flush_locked(struct moe_trace_writer *w)
{
    int r;

    if (w->error)
        return w->error;
    r = write_all(w->fd, w->buf, w->len);
    if (r < 0) {
        char what[128];

        snprintf(what, sizeof(what), "write failed: %s", strerror(-r));
        return fail_locked(w, r, what);
    }
    w->len = 0;
    return 0;
}

int moe_trace_writer_open(const char *path, const struct moe_trace_info *info,
                          struct moe_trace_writer **ret, struct moe_error *err)
{
    unsigned char hdr[MOE_TRACE_HEADER_BYTES] = {0};
    struct moe_trace_writer *w;
    int r;

    r = check_info(path, info->n_layers, info->n_experts, info->top_k, err);
    if (r < 0)
        return r;
    w = calloc(1, sizeof(*w));
    if (!w)
        return moe_error_set(err, -ENOMEM, "%s: out of memory", path);
    w->fd = -1;
    w->info = *info;
    /* The name is cut to 63 bytes so that it always ends with a NUL. */
    memset(w->info.model, 0, sizeof(w->info.model));
    snprintf(w->info.model, sizeof(w->info.model), "%.*s", (int)sizeof(w->info.model) - 1,
             info->model);
    w->path = strdup(path);
    w->buf = malloc(TRACE_BUF_BYTES);
    if (!w->path || !w->buf) {
        r = moe_error_set(err, -ENOMEM, "%s: out of memory", path);
        goto out_free;
    }
    r = pthread_mutex_init(&w->lock, NULL);
    if (r) {
        r = moe_error_set(err, -r, "%s: cannot create a mutex: %s", path, strerror(r));
        goto out_free;
    }
    w->fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (w->fd < 0) {
        r = moe_error_set(err, -errno, "%s: cannot create: %s", path, strerror(errno));
        goto out_mutex;
    }
    memcpy(hdr, MOE_TRACE_MAGIC, 8);
    put_u32(hdr + 8, MOE_TRACE_VERSION);
    put_u32(hdr + 12, MOE_TRACE_HEADER_BYTES);
    put_u32(hdr + 16, (uint32_t)info->n_layers);
    put_u32(hdr + 20, (uint32_t)info->n_experts);
    put_u32(hdr + 24, (uint32_t)info->top_k);
    put_u32(hdr + 28, info->lookahead ? MOE_TRACE_F_LOOKAHEAD : 0);
    put_u64(hdr + 32, info->expert_bytes);
    put_u64(hdr + TRACE_OFF_N_RECORDS, 0);
    memcpy(hdr + TRACE_OFF_MODEL, w->info.model, sizeof(w->info.model));
    r = write_all(w->fd, hdr, sizeof(hdr));
    if (r < 0) {
        r = moe_error_set(err, r, "%s: cannot write the header: %s", path, strerror(-r));
        goto out_close;
    }
    *ret = w;
    return 0;
out_close:
    close(w->fd);
out_mutex:
    pthread_mutex_destroy(&w->lock);
out_free:
    free(w->buf);
    free(w->path);
    free(w);
    return r;
}

int moe_trace_write(struct moe_trace_writer *w, uint32_t first_token, int layer, const int32_t *ids,
                    int n_tokens)
{
    return moe_trace_write_ahead(w, first_token, layer, ids, NULL, n_tokens);
}

/* A row of top_k distinct experts below E; -1 (the slot) when not. */
static int bad_row(const int32_t *row, int k, int E)
{
    for (int j = 0; j < k; j++) {
        if (row[j] < 0 || row[j] >= E)
            return j;
        for (int i = 0; i < j; i++)
            if (row[i] == row[j])
                return j;
    }
    return -1;
}

int moe_trace_write_ahead(struct moe_trace_writer *w, uint32_t first_token, int layer,
                          const int32_t *ids, const int32_t *next, int n_tokens)
{
    const int k = w->info.top_k, E = w->info.n_experts;
    const size_t rb = record_bytes(k, w->info.lookahead);
    char what[160];
    int r = 0;

    pthread_mutex_lock(&w->lock);
    if (w->error) {
        r = w->error;
        goto out;
    }
    /* Check the whole call first, so that a bad one writes nothing. */
    if (layer < 0 || layer >= w->info.n_layers || n_tokens < 0) {
        snprintf(what, sizeof(what), "bad call: layer %d of %d, %d tokens", layer, w->info.n_layers,
                 n_tokens);
        r = fail_locked(w, -EINVAL, what);
        goto out;
    }
    if ((uint64_t)first_token + (uint64_t)n_tokens > (uint64_t)UINT32_MAX + 1) {
        snprintf(what, sizeof(what), "token %" PRIu32 " + %d tokens is past 2^32", first_token,
                 n_tokens);
        r = fail_locked(w, -EOVERFLOW, what);
        goto out;
    }
    for (int t = 0; t < n_tokens; t++) {
        const int32_t *row = ids + (size_t)t * k;

        for (int j = 0; j < k; j++) {
            bool dup = false;

            for (int i = 0; i < j; i++)
                dup |= row[i] == row[j];
            if (row[j] < 0 || row[j] >= E || dup) {
                snprintf(what, sizeof(what),
                         "bad call: layer %d token %d slot %d: expert %" PRId32 " %s", layer, t, j,
                         row[j], dup ? "repeated" : "out of range");
                r = fail_locked(w, -EINVAL, what);
                goto out;
            }
        }
        if (next && w->info.lookahead) {
            int j = bad_row(next + (size_t)t * k, k, E);

            if (j >= 0) {
                snprintf(what, sizeof(what),
                         "bad call: layer %d token %d lookahead slot %d: expert %" PRId32
                         " repeated or out of range",
                         layer, t, j, next[(size_t)t * k + j]);
                r = fail_locked(w, -EINVAL, what);
                goto out;
            }
        }
    }
    if (w->limit && w->n_records + (uint64_t)n_tokens > w->limit) {
        w->full = true; /* dropped whole: the trace keeps whole steps */
        goto out;
    }
    for (int t = 0; t < n_tokens; t++) {
        const int32_t *row = ids + (size_t)t * k;
        unsigned char *p;

        if (w->len + rb > TRACE_BUF_BYTES) {
            r = flush_locked(w);
            if (r < 0)
                goto out;
        }
        p = w->buf + w->len;
        put_u32(p, first_token + (uint32_t)t);
        put_u16(p + 4, (uint16_t)layer);
        put_u16(p + 6, 0);
        for (int j = 0; j < k; j++)
            put_u16(p + 8 + 2 * j, (uint16_t)row[j]);
        if (w->info.lookahead)
            for (int j = 0; j < k; j++)
                put_u16(p + 8 + 2 * (k + j),
                        next ? (uint16_t)next[(size_t)t * k + j] : MOE_TRACE_NO_EXPERT);
        w->len += rb;
        w->n_records++;
    }
out:
    pthread_mutex_unlock(&w->lock);
    return r;
}

const struct moe_trace_info *moe_trace_writer_info(const struct moe_trace_writer *w)
{
    return &w->info; /* set at open, read-only after */
}

void moe_trace_writer_set_limit(struct moe_trace_writer *w, uint64_t max_records)
{
    pthread_mutex_lock(&w->lock);
    w->limit = max_records;
    pthread_mutex_unlock(&w->lock);
}

uint64_t moe_trace_writer_records(struct moe_trace_writer *w, bool *ret_full, int *ret_error)
{
    uint64_t n;

    pthread_mutex_lock(&w->lock);
    n = w->n_records;
    if (ret_full)
        *ret_full = w->full;
    if (ret_error)
        *ret_error = w->error;
    pthread_mutex_unlock(&w->lock);
    return n;
}

int moe_trace_writer_close(struct moe_trace_writer *w, struct moe_error *err)
{
    unsigned char n[8];
    int r;

    if (!w)
        return 0;
    pthread_mutex_lock(&w->lock);
    r = flush_locked(w);
    if (r == 0) {
        ssize_t done;

        put_u64(n, w->n_records);
        do
            done = pwrite(w->fd, n, sizeof(n), TRACE_OFF_N_RECORDS);
        while (done < 0 && errno == EINTR);
        if (done != (ssize_t)sizeof(n)) {
            r = done < 0 ? -errno : -EIO;
            fail_locked(w, r, "cannot patch n_records in the header");
        }
    }
    if (close(w->fd) < 0 && r == 0)
        r = fail_locked(w, -errno, "close failed");
    if (r < 0)
        moe_error_set(err, r, "%s: %s (%s); the records written before it are readable", w->path,
                      w->error_msg, strerror(-r));
    pthread_mutex_unlock(&w->lock);
    pthread_mutex_destroy(&w->lock);
    free(w->buf);
    free(w->path);
    free(w);
    return r;
}

void moe_trace_info_from_model(const struct moe_model *m, const char *name,
                               struct moe_trace_info *ret)
{
    memset(ret, 0, sizeof(*ret));
    snprintf(ret->model, sizeof(ret->model), "%.*s", (int)sizeof(ret->model) - 1, name ? name : "");
    ret->n_layers = m->cfg.n_layers;
    ret->n_experts = m->cfg.n_experts;
    ret->top_k = m->cfg.top_k;
    ret->expert_bytes = m->expert_bytes;
    ret->lookahead = true;
}

/* ---- parser ---------------------------------------------------------------------------- */

void moe_trace_free(struct moe_trace *t)
{
    if (!t)
        return;
    free(t->token);
    free(t->layer);
    free(t->expert);
    free(t->next);
    free(t);
}

int moe_trace_parse(const void *data, size_t len, const char *fname, struct moe_trace **ret,
                    struct moe_error *err)
{
    const unsigned char *p = data;
    struct moe_trace_info info = {0};
    struct moe_trace *t;
    uint64_t n_records, whole;
    uint32_t version, hdr_bytes, flags;
    size_t rb, body;
    int r;

    if (!fname)
        fname = "trace";
    if (len < MOE_TRACE_HEADER_BYTES)
        return moe_error_set(err, -EINVAL, "%s: %zu bytes: too short for the %d-byte trace header",
                             fname, len, MOE_TRACE_HEADER_BYTES);
    if (memcmp(p, MOE_TRACE_MAGIC, 8) != 0)
        return moe_error_set(err, -EINVAL, "%s: bad magic: not a routing trace (expected '%s')",
                             fname, MOE_TRACE_MAGIC);
    version = get_u32(p + 8);
    if (version != MOE_TRACE_VERSION)
        return moe_error_set(err, -EINVAL, "%s: version %" PRIu32 ": expected %d", fname, version,
                             MOE_TRACE_VERSION);
    hdr_bytes = get_u32(p + 12);
    if (hdr_bytes != MOE_TRACE_HEADER_BYTES)
        return moe_error_set(err, -EINVAL, "%s: header bytes %" PRIu32 ": expected %d", fname,
                             hdr_bytes, MOE_TRACE_HEADER_BYTES);
    /* Compare as u32 so that huge values are not taken for negative ints. */
    if (get_u32(p + 16) > MOE_TRACE_MAX_LAYERS || get_u32(p + 20) > MOE_TRACE_MAX_EXPERTS ||
        get_u32(p + 24) > MOE_TRACE_MAX_TOPK)
        return moe_error_set(err, -EINVAL,
                             "%s: n_layers %" PRIu32 ", n_experts %" PRIu32 ", top_k %" PRIu32
                             ": expected at most %d, %d and %d",
                             fname, get_u32(p + 16), get_u32(p + 20), get_u32(p + 24),
                             MOE_TRACE_MAX_LAYERS, MOE_TRACE_MAX_EXPERTS, MOE_TRACE_MAX_TOPK);
    info.n_layers = (int)get_u32(p + 16);
    info.n_experts = (int)get_u32(p + 20);
    info.top_k = (int)get_u32(p + 24);
    r = check_info(fname, info.n_layers, info.n_experts, info.top_k, err);
    if (r < 0)
        return r;
    flags = get_u32(p + 28);
    if (flags & ~(uint32_t)MOE_TRACE_F_LOOKAHEAD)
        return moe_error_set(err, -EINVAL,
                             "%s: unknown flags 0x%" PRIx32 " (this reader knows 0x%x, lookahead)",
                             fname, flags, MOE_TRACE_F_LOOKAHEAD);
    info.lookahead = flags & MOE_TRACE_F_LOOKAHEAD;
    info.expert_bytes = get_u64(p + 32);
    n_records = get_u64(p + TRACE_OFF_N_RECORDS);
    if (!memchr(p + TRACE_OFF_MODEL, 0, sizeof(info.model)))
        return moe_error_set(err, -EINVAL, "%s: the model name is not NUL-terminated", fname);
    /* Up to the NUL; what follows it is ignored (info.model is NUL-padded). */
    memcpy(info.model, p + TRACE_OFF_MODEL, strnlen((const char *)p + TRACE_OFF_MODEL, 64));
    for (int i = TRACE_OFF_RESERVED; i < MOE_TRACE_HEADER_BYTES; i++)
        if (p[i])
            return moe_error_set(err, -EINVAL, "%s: header byte %d is %d: expected 0 (reserved)",
                                 fname, i, p[i]);

    rb = record_bytes(info.top_k, info.lookahead);
    body = len - MOE_TRACE_HEADER_BYTES;
    whole = body / rb;
    if (n_records == 0) {
        if (body % rb)
            return moe_error_set(err, -EINVAL,
                                 "%s: record %" PRIu64 " at byte offset %" PRIu64
                                 " is incomplete: %zu of %zu bytes (n_records is 0: the writer "
                                 "did not finish)",
                                 fname, whole, MOE_TRACE_HEADER_BYTES + whole * rb, body % rb, rb);
        n_records = whole;
    } else if (n_records > whole) {
        return moe_error_set(err, -EINVAL,
                             "%s: record %" PRIu64 " at byte offset %" PRIu64
                             " is truncated: the header says %" PRIu64
                             " records, the file holds %" PRIu64 " whole ones",
                             fname, whole, MOE_TRACE_HEADER_BYTES + whole * rb, n_records, whole);
    } else if (body != n_records * rb) {
        return moe_error_set(err, -EINVAL,
                             "%s: %zu bytes past record %" PRIu64 " at byte offset %" PRIu64
                             ": the header says %" PRIu64 " records",
                             fname, body - (size_t)(n_records * rb), n_records - 1,
                             MOE_TRACE_HEADER_BYTES + n_records * rb, n_records);
    }

    t = calloc(1, sizeof(*t));
    if (!t)
        return moe_error_set(err, -ENOMEM, "%s: out of memory", fname);
    t->info = info;
    t->n_records = n_records;
    /* n_records * top_k fits: the records are in memory already. */
    t->token = malloc(MOE_MAX(n_records, 1) * sizeof(*t->token));
    t->layer = malloc(MOE_MAX(n_records, 1) * sizeof(*t->layer));
    t->expert = malloc(MOE_MAX(n_records * info.top_k, 1) * sizeof(*t->expert));
    if (info.lookahead)
        t->next = malloc(MOE_MAX(n_records * info.top_k, 1) * sizeof(*t->next));
    if (!t->token || !t->layer || !t->expert || (info.lookahead && !t->next)) {
        moe_trace_free(t);
        return moe_error_set(err, -ENOMEM, "%s: out of memory for %" PRIu64 " records", fname,
                             n_records);
    }
    for (uint64_t i = 0; i < n_records; i++) {
        const uint64_t off = MOE_TRACE_HEADER_BYTES + i * rb;
        const unsigned char *q = p + off;
        uint16_t *ex = t->expert + i * info.top_k;

        t->token[i] = get_u32(q);
        t->layer[i] = get_u16(q + 4);
        if (t->layer[i] >= info.n_layers) {
            r = moe_error_set(err, -EINVAL,
                              "%s: record %" PRIu64 " at byte offset %" PRIu64
                              ": layer %u: expected below n_layers %d",
                              fname, i, off, t->layer[i], info.n_layers);
            goto fail;
        }
        if (get_u16(q + 6)) {
            r = moe_error_set(err, -EINVAL,
                              "%s: record %" PRIu64 " at byte offset %" PRIu64
                              ": reserved field is %u: expected 0",
                              fname, i, off, get_u16(q + 6));
            goto fail;
        }
        for (int j = 0; j < info.top_k; j++) {
            ex[j] = get_u16(q + 8 + 2 * j);
            if (ex[j] >= info.n_experts) {
                r = moe_error_set(err, -EINVAL,
                                  "%s: record %" PRIu64 " at byte offset %" PRIu64
                                  ": expert %u in slot %d: expected below n_experts %d",
                                  fname, i, off, ex[j], j, info.n_experts);
                goto fail;
            }
            for (int k = 0; k < j; k++)
                if (ex[k] == ex[j]) {
                    r = moe_error_set(err, -EINVAL,
                                      "%s: record %" PRIu64 " at byte offset %" PRIu64
                                      ": expert %u twice (slots %d and %d)",
                                      fname, i, off, ex[j], k, j);
                    goto fail;
                }
        }
        if (info.lookahead) {
            uint16_t *nx = t->next + i * info.top_k;
            int none = 0, j;
            int32_t row[MOE_TRACE_MAX_TOPK];

            for (j = 0; j < info.top_k; j++) {
                nx[j] = get_u16(q + 8 + 2 * (info.top_k + j));
                none += nx[j] == MOE_TRACE_NO_EXPERT;
                row[j] = nx[j];
            }
            j = none ? -1 : bad_row(row, info.top_k, info.n_experts);
            if ((none && none != info.top_k) || j >= 0) {
                r = moe_error_set(err, -EINVAL,
                                  "%s: record %" PRIu64 " at byte offset %" PRIu64
                                  ": lookahead experts must be %d distinct experts below %d, "
                                  "or all 0xffff (none)",
                                  fname, i, off, info.top_k, info.n_experts);
                goto fail;
            }
        }
    }
    *ret = t;
    return 0;
fail:
    moe_trace_free(t);
    return r;
}

int moe_trace_read(const char *path, struct moe_trace **ret, struct moe_error *err)
{
    char *buf;
    size_t len;
    int r;

    r = moe_read_file(path, MOE_TRACE_MAX_FILE_BYTES, &buf, &len, err);
    if (r < 0)
        return r;
    r = moe_trace_parse(buf, len, path, ret, err);
    free(buf);
    return r;
}

/* ---- steps ----------------------------------------------------------------------------- */

int moe_trace_steps(const struct moe_trace *t, struct moe_trace_step **ret, uint64_t *n_steps)
{
    struct moe_trace_step *s;
    uint64_t n = 0;

    /* Count first: one allocation of the exact size. */
    for (uint64_t i = 0, run = 0; i < t->n_records; i++) {
        if (i == 0 || t->layer[i] != t->layer[i - 1] || run == UINT32_MAX) {
            n++;
            run = 0;
        }
        run++;
    }
    s = malloc(MOE_MAX(n, 1) * sizeof(*s));
    if (!s)
        return -ENOMEM;
    n = 0;
    for (uint64_t i = 0; i < t->n_records; i++) {
        if (i == 0 || t->layer[i] != t->layer[i - 1] || s[n - 1].n == UINT32_MAX) {
            s[n].first = i;
            s[n].n = 0;
            s[n].layer = t->layer[i];
            n++;
        }
        s[n - 1].n++;
    }
    *ret = s;
    *n_steps = n;
    return 0;
}
