/*
 * The packed store's tools (pack.h): writing a store from an open model;
 * verifying a store against its checksums and against its checkpoint.  The
 * format, its index moe-pack.json, is pack_index.c's; opening a store for
 * serving is model.c's (moe_model_open), from the index parsed there.
 *
 * Writing streams: each tensor is read once (pread on the model's fds), in
 * pieces of at most the I/O buffer, hashed on the way, and the buffer is
 * written to experts.bin in large sequential writes whose writeback is
 * started at once and waited for one buffer later, so that dirty pages stay
 * bounded and the final fsync is short.  Verification reads experts.bin
 * once, front to back, feeding each piece to the tensor and the blob it
 * belongs to.
 *
 * No state, no locks.
 */
#include "fileio.h"
#include "json.h"
#include "model.h"
#include "pack.h"
#include "quant.h"
#include "safetensors.h"
#include "dtype.h"

#include <errno.h>
#include <math.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#define CONFIG_NAME "config.json"
#define CONFIG_MAX_BYTES (16u << 20)
/* Bytes per read and write when packing or verifying. */
#define IO_BYTES (32u << 20)
#define TMP_SUFFIX ".tmp"

static uint64_t align_up(uint64_t x)
{
    return (x + MOE_PACK_ALIGN - 1) & ~(uint64_t)(MOE_PACK_ALIGN - 1);
}

static char *path_join(const char *dir, const char *name)
{
    char *s;

    if (asprintf(&s, "%s/%s", dir, name) < 0)
        return NULL;
    return s;
}

/* Reads and parses dir/moe-pack.json. */
static int index_read(const char *dir, struct moe_pack_index *ret, struct moe_error *err)
{
    char *path = path_join(dir, MOE_PACK_INDEX), *buf = NULL;
    size_t len;
    int r;

    if (!path)
        return moe_error_set(err, -ENOMEM, "out of memory");
    r = moe_read_file(path, MOE_PACK_INDEX_MAX, &buf, &len, err);
    if (r == 0)
        r = moe_pack_index_parse(buf, len, path, ret, err);
    free(buf);
    free(path);
    return r;
}

/* ---- small file helpers ---------------------------------------------------- */

static int write_all(int fd, const void *buf, size_t len, const char *path, struct moe_error *err)
{
    const char *p = buf;

    while (len > 0) {
        ssize_t n = write(fd, p, MOE_MIN(len, (size_t)1 << 30));

        if (n < 0) {
            if (errno == EINTR)
                continue;
            return moe_error_set(err, -errno, "%s: write failed: %s", path, strerror(errno));
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int fsync_dir(const char *dir, struct moe_error *err)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC), r = 0;

    if (fd < 0)
        return moe_error_set(err, -errno, "%s: cannot open the directory to sync it: %s", dir,
                             strerror(errno));
    if (fsync(fd) < 0)
        r = moe_error_set(err, -errno, "%s: fsync of the directory failed: %s", dir,
                          strerror(errno));
    close(fd);
    return r;
}

/* Writes len bytes to dir/name through dir/name.tmp: write, fsync, rename. */
static int write_file_atomic(const char *dir, const char *name, const void *buf, size_t len,
                             struct moe_error *err)
{
    char *path = path_join(dir, name), *tmp = NULL;
    int fd = -1, r;

    if (!path || asprintf(&tmp, "%s" TMP_SUFFIX, path) < 0) {
        tmp = NULL;
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        r = moe_error_set(err, -errno, "%s: cannot create: %s", tmp, strerror(errno));
        goto out;
    }
    r = write_all(fd, buf, len, tmp, err);
    if (r == 0 && fsync(fd) < 0)
        r = moe_error_set(err, -errno, "%s: fsync failed: %s", tmp, strerror(errno));
    if (close(fd) < 0 && r == 0)
        r = moe_error_set(err, -errno, "%s: close failed: %s", tmp, strerror(errno));
    fd = -1;
    if (r == 0 && rename(tmp, path) < 0)
        r = moe_error_set(err, -errno, "%s: cannot rename to %s: %s", tmp, path, strerror(errno));
    if (r < 0)
        unlink(tmp);
out:
    free(tmp);
    free(path);
    return r;
}

/* mkdir -p; *ret_made says whether the last component was created. */
static int make_dirs(const char *dir, bool *ret_made, struct moe_error *err)
{
    char *p = strdup(dir);
    struct stat st;
    int r = 0;

    *ret_made = false;
    if (!p)
        return moe_error_set(err, -ENOMEM, "out of memory");
    for (char *s = p + 1; *s; s++) {
        if (*s != '/')
            continue;
        *s = 0;
        if (mkdir(p, 0755) < 0 && errno != EEXIST) {
            r = moe_error_set(err, -errno, "%s: cannot create directory: %s", p, strerror(errno));
            goto out;
        }
        *s = '/';
    }
    if (mkdir(p, 0755) == 0) {
        *ret_made = true;
    } else if (errno != EEXIST) {
        r = moe_error_set(err, -errno, "%s: cannot create directory: %s", p, strerror(errno));
    } else if (stat(p, &st) < 0 || !S_ISDIR(st.st_mode)) {
        r = moe_error_set(err, -ENOTDIR, "%s: exists and is not a directory", p);
    }
out:
    free(p);
    return r;
}

static bool exists_in(const char *dir, const char *name)
{
    char *p = path_join(dir, name);
    struct stat st;
    bool yes;

    if (!p)
        return false;
    yes = lstat(p, &st) == 0;
    free(p);
    return yes;
}

static void unlink_in(const char *dir, const char *name)
{
    char *p = path_join(dir, name);

    if (p)
        unlink(p);
    free(p);
}

/* ---- writing ---------------------------------------------------------------- */

/* Most non-expert MoE tensors of a layer: router, score bias, router bias,
 * expert biases (2), shared expert (3, and 3 scales), shared-expert gate. */
#define PACK_OTHERS_MAX 12

/* One tensor to write: where it comes from and where it goes. */
struct item {
    const struct moe_tensor_ref *t;
    int layer;                      /* MoE layer it belongs to */
    int expert;                     /* routed expert whose blob holds it, or -1 */
    int part;                       /* its enum moe_expert_part in that expert, or -1; 3 to 5:
                                     * the scales of gate, up, down */
    uint64_t offset;                /* in experts.bin */
    const struct moe_expert_ref *x; /* the expert (routed or shared) it is part of, or NULL */
    int n_parts;                    /* tensors of x in the store: 3, or 6 with scales */
    bool quantize;                  /* made by --quantize from x's part (part % 3) */
    uint64_t nbytes;                /* bytes in the store */
};

/* --quantize: the format and group, or .q NONE to copy tensors as they are. */
struct qopts {
    struct moe_quant_fmt f;
};

/* experts.bin being written: a buffer of the bytes from pos on. */
struct writer {
    const struct moe_model *m;
    int fd;
    const char *path;
    uint8_t *buf;
    size_t cap, fill;
    uint64_t pos;      /* file offset of buf[0] */
    uint64_t prev_at;  /* the previous flushed range, whose writeback ... */
    uint64_t prev_len; /* ... the next flush waits for */
    struct moe_error *err;
};

static int w_flush(struct writer *w)
{
    int r;

    if (w->fill == 0)
        return 0;
    r = write_all(w->fd, w->buf, w->fill, w->path, w->err);
    if (r < 0)
        return r;
    /* Start writeback of what was just written, wait for the previous
     * buffer's and drop it from the page cache: dirty pages stay within two
     * buffers, and a model larger than memory does not evict everything
     * else.  Best effort: where unsupported (tmpfs, some FUSE) fsync at the
     * end still makes the data durable. */
    (void)sync_file_range(w->fd, (off_t)w->pos, (off_t)w->fill, SYNC_FILE_RANGE_WRITE);
    if (w->prev_len) {
        (void)sync_file_range(w->fd, (off_t)w->prev_at, (off_t)w->prev_len,
                              SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                                  SYNC_FILE_RANGE_WAIT_AFTER);
        (void)posix_fadvise(w->fd, (off_t)w->prev_at, (off_t)w->prev_len, POSIX_FADV_DONTNEED);
    }
    w->prev_at = w->pos;
    w->prev_len = w->fill;
    w->pos += w->fill;
    w->fill = 0;
    return 0;
}

/* Zeros up to file offset off. */
static int w_pad(struct writer *w, uint64_t off)
{
    while (w->pos + w->fill < off) {
        size_t n;

        if (w->fill == w->cap) {
            int r = w_flush(w);

            if (r < 0)
                return r;
        }
        n = (size_t)MOE_MIN(off - (w->pos + w->fill), (uint64_t)(w->cap - w->fill));
        memset(w->buf + w->fill, 0, n);
        w->fill += n;
    }
    return 0;
}

/* Appends tensor t, read from the model in pieces, hashing it into ts and
 * (when not NULL) the blob's es. */
static int w_tensor(struct writer *w, const struct moe_tensor_ref *t, XXH3_state_t *ts,
                    XXH3_state_t *es)
{
    const struct moe_model_file *f = &w->m->files[t->file];
    uint64_t done = 0;

    while (done < t->nbytes) {
        size_t n;
        int64_t got;

        if (w->fill == w->cap) {
            int r = w_flush(w);

            if (r < 0)
                return r;
        }
        n = (size_t)MOE_MIN(t->nbytes - done, (uint64_t)(w->cap - w->fill));
        got = moe_pread_full(f->fd, w->buf + w->fill, n, t->offset + done);
        if (got < 0)
            return moe_error_set(w->err, (int)got,
                                 "%s: tensor '%s': read at offset %" PRIu64 " failed: %s", f->path,
                                 t->name, t->offset + done, strerror((int)-got));
        if ((size_t)got < n)
            return moe_error_set(w->err, -EIO,
                                 "%s: tensor '%s': short read at offset %" PRIu64
                                 ": file truncated since it was opened?",
                                 f->path, t->name, t->offset + done + (uint64_t)got);
        XXH3_64bits_update(ts, w->buf + w->fill, n);
        if (es)
            XXH3_64bits_update(es, w->buf + w->fill, n);
        w->fill += n;
        done += n;
    }
    return 0;
}

/* cols elements of dtype (f32, f16 or bf16) at src, to fp32. */
static void row_to_f32(enum moe_dtype dtype, const uint8_t *src, int64_t cols, float *out)
{
    for (int64_t c = 0; c < cols; c++) {
        uint16_t h;

        switch (dtype) {
        case MOE_DTYPE_F32:
            memcpy(&out[c], src + 4 * c, 4);
            break;
        case MOE_DTYPE_F16:
            memcpy(&h, src + 2 * c, 2);
            out[c] = moe_f16_to_f32(h);
            break;
        default:
            memcpy(&h, src + 2 * c, 2);
            out[c] = moe_bf16_to_f32(h);
            break;
        }
    }
}

/*
 * Row r of part k (0 gate, 1 up, 2 down) of expert x in m, as fp32, into
 * out: a plain tensor converted, an FP8 one dequantized with its scales
 * (fp8_scales: the whole scale tensor, read by the caller).  tmp holds a
 * row of the tensor.
 */
static int read_row_f32(const struct moe_model *m, const struct moe_expert_ref *x, int k,
                        const uint8_t *fp8_scales, int64_t r, uint8_t *tmp, float *out,
                        struct moe_error *err)
{
    const struct moe_tensor_ref *t[6];
    const struct moe_model_file *f;
    int64_t cols, got;
    uint64_t rb;

    moe_expert_tensors(x, t);
    f = &m->files[t[k]->file];
    cols = t[k]->cols;
    rb = x->quant.q != MOE_QUANT_NONE ? moe_quant_data_bytes(x->quant.q, 1, cols)
                                      : (uint64_t)cols * moe_dtype_size(t[k]->dtype);
    got = moe_pread_full(f->fd, tmp, rb, t[k]->offset + (uint64_t)r * rb);
    if (got < 0)
        return moe_error_set(err, (int)got, "%s: tensor '%s': read failed: %s", f->path, t[k]->name,
                             strerror((int)-got));
    if ((uint64_t)got < rb)
        return moe_error_set(err, -EIO,
                             "%s: tensor '%s': short read: file truncated since it was opened?",
                             f->path, t[k]->name);
    if (x->quant.q != MOE_QUANT_NONE) {
        int64_t sr, sc;

        moe_quant_scale_shape(&x->quant, t[k]->rows, cols, &sr, &sc);
        moe_quant_dequant_span(&x->quant, tmp,
                               fp8_scales + (size_t)(r / x->quant.brows) * (size_t)sc *
                                                moe_quant_scale_size(x->quant.q),
                               0, cols, out);
        return 0;
    }
    row_to_f32(t[k]->dtype, tmp, cols, out);
    return 0;
}

/*
 * Quantizes part k (0..2) of expert x of m to q: values to vals
 * (moe_quant_data_bytes), scales to scales ([rows, cols / group]).  Reads
 * the source a row at a time.
 */
static int quantize_part(const struct moe_model *m, const struct moe_expert_ref *x, int k,
                         const struct moe_quant_fmt *q, uint8_t *vals, float *scales,
                         struct moe_error *err)
{
    const struct moe_tensor_ref *t[6];
    int64_t rows, cols;
    uint8_t *tmp = NULL, *fs = NULL;
    float *row = NULL;
    uint64_t rb;
    int r = 0;

    moe_expert_tensors(x, t);
    rows = t[k]->rows;
    cols = t[k]->cols;
    rb = moe_quant_data_bytes(q->q, 1, cols);
    tmp = malloc((size_t)cols * 4);
    row = malloc((size_t)cols * sizeof(float));
    if (x->quant.q != MOE_QUANT_NONE)
        fs = malloc(t[k + 3]->nbytes ? t[k + 3]->nbytes : 1);
    if (!tmp || !row || (x->quant.q != MOE_QUANT_NONE && !fs)) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    if (fs) {
        r = moe_model_read(m, t[k + 3], fs, err);
        if (r == 0)
            r = moe_quant_check_scales(x->quant.q, fs,
                                       t[k + 3]->nbytes / moe_quant_scale_size(x->quant.q),
                                       t[k + 3]->name, err);
        if (r < 0)
            goto out;
    }
    for (int64_t i = 0; i < rows; i++) {
        r = read_row_f32(m, x, k, fs, i, tmp, row, err);
        if (r < 0)
            goto out;
        for (int64_t c = 0; c < cols; c++)
            if (!isfinite(row[c])) {
                r = moe_error_set(err, -EINVAL,
                                  "%s: tensor '%s': element [%" PRId64 ", %" PRId64
                                  "] is %g: only finite weights can be quantized",
                                  m->files[t[k]->file].path, t[k]->name, i, c, (double)row[c]);
                goto out;
            }
        moe_quant_row(q->q, q->bcols, row, cols, vals + (uint64_t)i * rb,
                      scales + (size_t)i * (size_t)(cols / q->bcols));
    }
out:
    free(tmp);
    free(row);
    free(fs);
    return r;
}

/*
 * Quantizes part k (0..2) of transposed expert x (Llama 4's, gpt-oss's),
 * already made plain in src (moe_expert_untranspose: gate and up [ffn,
 * hidden], down [hidden, ffn], row-major, the source dtype): each row is
 * one the kernels read (its columns are the dot's reduction dimension), so
 * its groups run along that row, as for a plain expert.  Values to vals,
 * scales to scales ([rows, cols / group]).
 */
static int quantize_plain(const struct moe_model *m, const struct moe_expert_ref *x, int k,
                          const uint8_t *src, const struct moe_quant_fmt *q, uint8_t *vals,
                          float *scales, struct moe_error *err)
{
    const struct moe_tensor_ref *t[6];
    int64_t rows, cols;
    size_t es;
    uint64_t rb;
    float *row;

    moe_expert_tensors(x, t);
    rows = t[k]->rows;
    cols = t[k]->cols;
    es = moe_dtype_size(t[k]->dtype);
    rb = moe_quant_data_bytes(q->q, 1, cols);
    row = malloc((size_t)cols * sizeof(float));
    if (!row)
        return moe_error_set(err, -ENOMEM, "out of memory");
    for (int64_t i = 0; i < rows; i++) {
        row_to_f32(t[k]->dtype, src + (size_t)(i * cols) * es, cols, row);
        for (int64_t c = 0; c < cols; c++)
            if (!isfinite(row[c])) {
                /* [i, c] of the plain matrix is [c, i] of the stored one */
                int r = moe_error_set(err, -EINVAL,
                                      "%s: tensor '%s' (transposed): element [%" PRId64 ", %" PRId64
                                      "] of the expert's %s is %g: only finite "
                                      "weights can be quantized",
                                      m->files[t[k]->file].path, t[k]->name, i, c,
                                      k == 0   ? "gate"
                                      : k == 1 ? "up"
                                               : "down",
                                      (double)row[c]);

                free(row);
                return r;
            }
        moe_quant_row(q->q, q->bcols, row, cols, vals + (uint64_t)i * rb,
                      scales + (size_t)i * (size_t)(cols / q->bcols));
    }
    free(row);
    return 0;
}

/* Appends len bytes from p, hashing them into ts and (when not NULL) es. */
static int w_bytes(struct writer *w, const uint8_t *p, uint64_t len, XXH3_state_t *ts,
                   XXH3_state_t *es)
{
    uint64_t done = 0;

    while (done < len) {
        size_t n;

        if (w->fill == w->cap) {
            int r = w_flush(w);

            if (r < 0)
                return r;
        }
        n = (size_t)MOE_MIN(len - done, (uint64_t)(w->cap - w->fill));
        memcpy(w->buf + w->fill, p + done, n);
        XXH3_64bits_update(ts, p + done, n);
        if (es)
            XXH3_64bits_update(es, p + done, n);
        w->fill += n;
        done += n;
    }
    return 0;
}

/* Whether the store's copy of expert x is not its checkpoint's bytes as
 * they lie: transposed (Llama 4's, gpt-oss's bf16) or with gate and up rows
 * interleaved (gpt-oss's MXFP4); such an expert is read whole and made
 * plain (read_plain_expert). */
static bool needs_plain(const struct moe_expert_ref *x)
{
    return x->transposed || x->interleaved;
}

/* Offset of part k (0..5, moe_expert_tensors' order) of expert x in its
 * plain copy: its tensors back to back. */
static uint64_t plain_part_off(const struct moe_expert_ref *x, int k)
{
    const struct moe_tensor_ref *t[6];
    uint64_t off = 0;

    moe_expert_tensors(x, t);
    for (int j = 0; j < k; j++)
        off += t[j]->nbytes;
    return off;
}

/*
 * Reads expert x of a transposed layout (Llama 4's, gpt-oss's) or with its
 * gate and up rows interleaved (gpt-oss's MXFP4: values and scales) and
 * makes it plain in *buf (grown to x->nbytes as needed): gate, up and down
 * back to back, then their scales when quantized, as a store holds them.
 */
/* Makes *p hold at least n bytes (contents not kept); 0, or -ENOMEM with
 * err naming the tensor being quantized. */
static int grow(void **p, size_t *cap, size_t n, const char *name, struct moe_error *err)
{
    if (*cap >= n && *p)
        return 0;
    free(*p);
    *p = malloc(n);
    *cap = *p ? n : 0;
    return *p ? 0 : moe_error_set(err, -ENOMEM, "out of memory quantizing '%s'", name);
}

static int read_plain_expert(const struct moe_model *m, const struct moe_expert_ref *x,
                             uint8_t **buf, size_t *cap, struct moe_error *err)
{
    const struct moe_tensor_ref *t[6];
    int nt = moe_expert_tensors(x, t);
    uint8_t *b = *buf;
    uint64_t off = 0;
    int r = 0;

    if (*cap < x->nbytes) {
        b = realloc(*buf, x->nbytes);
        if (!b)
            return moe_error_set(err, -ENOMEM, "out of memory for an expert of %" PRIu64 " bytes",
                                 x->nbytes);
        *buf = b;
        *cap = x->nbytes;
    }
    for (int k = 0; k < nt && r == 0; k++) {
        r = moe_model_read(m, t[k], b + off, err);
        off += t[k]->nbytes;
    }
    if (r < 0)
        return r;
    if (x->transposed)
        r = moe_expert_untranspose(x, b, b + x->gate.nbytes, b + x->gate.nbytes + x->up.nbytes);
    else
        r = moe_expert_deinterleave(x, b, b + plain_part_off(x, 3));
    if (r < 0)
        return moe_error_set(err, r, "out of memory making expert '%s' plain", x->gate.name);
    return 0;
}

/* Columns of t as a store holds it: [rows, cols] of its stored elements
 * (two MXFP4 values per byte: cols / 2). */
static int64_t stored_cols(const struct moe_tensor_ref *t)
{
    if (t->rows <= 0)
        return t->cols;
    return (int64_t)(t->nbytes / ((uint64_t)t->rows * moe_dtype_size(t->dtype)));
}

static void hex64(uint64_t x, char buf[17])
{
    snprintf(buf, 17, "%016" PRIx64, x);
}

/* Adds item's entry to the "tensors" object, with the shape exactly as the
 * model's header has it.  A slice of a fused tensor (one expert's gate, up
 * or down of gate_up_proj, down_proj) is stored under the per-expert name
 * and shape that the per-expert layout gives it, so that a store has one
 * layout whatever its checkpoint's. */
static int index_add_tensor(const struct moe_model *m, json_t *tensors, const struct item *it,
                            uint64_t xxh3)
{
    const struct moe_tensor_ref *t = it->t;
    const struct moe_st_tensor *h = moe_st_header_find(m->headers[t->file], t->name);
    json_t *shape = json_array(), *e;
    char hex[17], name[300];
    const char *key = t->name;

    /* Every ref of an open model points into its headers. */
    if (!h || !shape) {
        json_decref(shape);
        return -ENOMEM;
    }
    if (t->slice) {
        /* Only routed experts are ever sliced.  Parts 3 to 5 are the
         * scales of gate, up and down (MXFP4): "<name>_scale".  The
         * columns are the stored ones (MXFP4 values: two per byte). */
        const char *suf = it->part >= 3 ? moe_quant_scale_suffix(it->x->quant.q) : "";
        int64_t cols = stored_cols(t);
        char base[256];

        if (it->part < 0 ||
            moe_model_expert_tensor_name(m, it->layer, it->expert,
                                         (enum moe_expert_part)(it->part % 3), base,
                                         sizeof(base)) >= (int)sizeof(base) ||
            snprintf(name, sizeof(name), "%s%s", base, suf) >= (int)sizeof(name) ||
            json_array_append_new(shape, json_integer(t->rows)) < 0 ||
            json_array_append_new(shape, json_integer(cols)) < 0) {
            json_decref(shape);
            return -ENOMEM;
        }
        key = name;
    } else {
        for (int i = 0; i < h->ndim; i++)
            if (json_array_append_new(shape, json_integer(h->shape[i])) < 0) {
                json_decref(shape);
                return -ENOMEM;
            }
    }
    hex64(xxh3, hex);
    e = json_pack("{s:s, s:o, s:I, s:I, s:s}", "dtype", moe_dtype_name(t->dtype), "shape", shape,
                  "offset", (json_int_t)it->offset, "nbytes", (json_int_t)t->nbytes, "xxh3", hex);
    if (!e || json_object_set_new(tensors, key, e) < 0)
        return -ENOMEM;
    return 0;
}

/* Bytes of the store's copy of x's part k (0..5) under q. */
static uint64_t part_bytes(const struct moe_expert_ref *x, int k, const struct qopts *q)
{
    const struct moe_tensor_ref *t[6];

    moe_expert_tensors(x, t);
    if (q->f.q == MOE_QUANT_NONE)
        return t[k]->nbytes;
    if (k < 3)
        return moe_quant_data_bytes(q->f.q, t[k]->rows, t[k]->cols);
    return moe_quant_scale_bytes(&q->f, t[k - 3]->rows, t[k - 3]->cols);
}

/* The tensors of expert x in the store: 3, or 6 with scales. */
static int store_parts(const struct moe_expert_ref *x, const struct qopts *q)
{
    return q->f.q != MOE_QUANT_NONE || x->quant.q != MOE_QUANT_NONE ? 6 : 3;
}

/* The item of part k of expert x (routed expert e, or a shared one: -1) at pos. */
static struct item expert_item(const struct moe_expert_ref *x, int layer, int e, int k,
                               const struct qopts *q, uint64_t pos)
{
    const struct moe_tensor_ref *t[6];
    bool quantize = q->f.q != MOE_QUANT_NONE;

    moe_expert_tensors(x, t);
    return (struct item){.t = t[quantize ? k % 3 : k],
                         .layer = layer,
                         .expert = e,
                         .part = k,
                         .offset = pos,
                         .x = x,
                         .n_parts = store_parts(x, q),
                         .quantize = quantize,
                         .nbytes = part_bytes(x, k, q)};
}

/* The "tensors" entry of a quantized item: values under the per-expert
 * name ([rows, cols], two int4 per byte: [rows, cols / 2]), scales under
 * "<name>_scale" [rows, cols / group]. */
static int index_add_quantized(const struct moe_model *m, const struct qopts *q, json_t *tensors,
                               const struct item *it, uint64_t xxh3)
{
    const struct moe_tensor_ref *t = it->t;
    int k = it->part % 3;
    char name[300], hex[17];
    int64_t d0 = t->rows, d1;
    enum moe_dtype dt;
    json_t *e;

    if (it->expert >= 0) {
        if (moe_model_expert_tensor_name(m, it->layer, it->expert, (enum moe_expert_part)k, name,
                                         sizeof(name) - 16) >= (int)sizeof(name) - 16)
            return -ENOMEM;
    } else {
        snprintf(name, sizeof(name), "%s", t->name);
    }
    if (it->part < 3) {
        dt = moe_quant_value_dtype(q->f.q);
        d1 = q->f.q == MOE_QUANT_INT4 ? t->cols / 2 : t->cols;
    } else {
        strcat(name, moe_quant_scale_suffix(q->f.q));
        dt = MOE_DTYPE_F32;
        d1 = t->cols / q->f.bcols;
    }
    hex64(xxh3, hex);
    e = json_pack("{s:s, s:[I, I], s:I, s:I, s:s}", "dtype", moe_dtype_name(dt), "shape",
                  (json_int_t)d0, (json_int_t)d1, "offset", (json_int_t)it->offset, "nbytes",
                  (json_int_t)it->nbytes, "xxh3", hex);
    if (!e || json_object_set_new(tensors, name, e) < 0)
        return -ENOMEM;
    return 0;
}

/* Lists the tensors to write, in file order, with their offsets; returns the
 * count, and sets *ret_end to the end of the last (aligned). */
static size_t plan(const struct moe_model *m, const struct qopts *q, struct item *items,
                   uint64_t *ret_end)
{
    uint64_t pos = 0;
    size_t n = 0;

    for (int i = 0; i < m->cfg.n_layers; i++) {
        const struct moe_layer *L = &m->layers[i];

        if (!L->is_moe)
            continue;
        for (int e = 0; e < m->cfg.n_experts; e++) {
            const struct moe_expert_ref *x = &L->experts[e];

            /* a blob: its tensors back to back */
            pos = align_up(pos);
            for (int k = 0; k < store_parts(x, q); k++) {
                items[n] = expert_item(x, i, e, k, q, pos);
                pos += items[n++].nbytes;
            }
        }
    }
    for (int i = 0; i < m->cfg.n_layers; i++) {
        const struct moe_layer *L = &m->layers[i];
        const struct moe_tensor_ref *others[5];
        int k = 0;

        if (!L->is_moe)
            continue;
        others[k++] = &L->router;
        if (L->has_bias)
            others[k++] = &L->bias;
        if (L->has_router_bias)
            others[k++] = &L->router_bias;
        if (L->has_expert_bias) {
            others[k++] = &L->gate_up_bias;
            others[k++] = &L->down_bias;
        }
        for (int j = 0; j < k; j++) {
            pos = align_up(pos);
            items[n++] =
                (struct item){others[j], i, -1, -1, pos, NULL, 0, false, others[j]->nbytes};
            pos += others[j]->nbytes;
        }
        for (int j = 0; L->has_shared && j < store_parts(&L->shared, q); j++) {
            /* each tensor aligned, as other tensors outside blobs */
            pos = align_up(pos);
            items[n] = expert_item(&L->shared, i, -1, j, q, pos);
            pos += items[n++].nbytes;
        }
        if (L->has_shared_gate) {
            pos = align_up(pos);
            items[n++] = (struct item){&L->shared_gate,      i, -1, -1, pos, NULL, 0, false,
                                       L->shared_gate.nbytes};
            pos += L->shared_gate.nbytes;
        }
    }
    *ret_end = align_up(pos);
    return n;
}

/* Refuses out_dir when it is the checkpoint's directory or holds a store or
 * a checkpoint; removes an old store's index when overwriting. */
static int check_out_dir(const struct moe_model *m, const char *out_dir, bool overwrite,
                         struct moe_error *err)
{
    static const char *const ckpt[] = {"model.safetensors", "model.safetensors.index.json"};
    struct stat a, b;
    char *p;
    int r;

    if (stat(out_dir, &a) == 0 && stat(m->dir, &b) == 0 && a.st_dev == b.st_dev &&
        a.st_ino == b.st_ino)
        return moe_error_set(err, -EINVAL,
                             "%s: is the directory of the model being packed (%s): expected "
                             "another directory for the store",
                             out_dir, m->dir);
    for (size_t i = 0; i < MOE_ARRAY_SIZE(ckpt); i++)
        if (exists_in(out_dir, ckpt[i]))
            return moe_error_set(err, -EEXIST,
                                 "%s: holds a checkpoint (%s): expected an empty directory or "
                                 "a packed store",
                                 out_dir, ckpt[i]);
    if (!exists_in(out_dir, MOE_PACK_INDEX))
        return 0;
    if (!overwrite)
        return moe_error_set(err, -EEXIST,
                             "%s: already holds a packed store (%s): remove it, or overwrite it "
                             "(moectl pack --force)",
                             out_dir, MOE_PACK_INDEX);
    /* From here the directory is not a store until the new index lands. */
    p = path_join(out_dir, MOE_PACK_INDEX);
    if (!p)
        return moe_error_set(err, -ENOMEM, "out of memory");
    r = unlink(p) < 0
            ? moe_error_set(err, -errno, "%s: cannot remove the old index: %s", p, strerror(errno))
            : 0;
    free(p);
    return r == 0 ? fsync_dir(out_dir, err) : r;
}

static json_t *index_root(const struct moe_model *m, uint64_t data_bytes)
{
    json_t *files = json_array(), *root;

    if (!files)
        return NULL;
    for (size_t i = 0; i < m->n_files; i++) {
        json_t *f =
            json_pack("{s:s, s:I}", "name", m->files[i].name, "size", (json_int_t)m->files[i].size);

        if (!f || json_array_append_new(files, f) < 0) {
            json_decref(files);
            return NULL;
        }
    }
    root = json_pack("{s:s, s:i, s:i, s:s, s:I, s:{s:o}, s:{}, s:[]}", "format", MOE_PACK_FORMAT,
                     "version", MOE_PACK_VERSION, "alignment", (int)MOE_PACK_ALIGN, "data",
                     MOE_PACK_DATA, "data_bytes", (json_int_t)data_bytes, "source", "files", files,
                     "tensors", "experts");
    return root;
}

int moe_pack_write(const struct moe_model *m, const char *out_dir, bool overwrite,
                   moe_pack_progress_fn progress, void *ctx, struct moe_error *err)
{
    return moe_pack_write_quant(m, out_dir, overwrite, NULL, progress, ctx, err);
}

/* Checks that every expert of m can be quantized to q; -EINVAL naming the
 * first tensor that cannot. */
static int check_quantize(const struct moe_model *m, const struct moe_quant_fmt *q,
                          struct moe_error *err)
{
    if (q->q != MOE_QUANT_INT8 && q->q != MOE_QUANT_INT4)
        return moe_error_set(err, -EINVAL, "--quantize %s: expected int8 or int4",
                             moe_quant_name(q->q));
    if (q->bcols < 32 || q->bcols > MOE_QUANT_GROUP_MAX || q->bcols % 32 != 0 || q->brows != 1)
        return moe_error_set(err, -EINVAL, "--group %d: expected a multiple of 32 from 32 to %d",
                             q->bcols, MOE_QUANT_GROUP_MAX);
    if (m->expert_quant.q == MOE_QUANT_MXFP4)
        return moe_error_set(err, -ENOTSUP,
                             "%s: its experts are MXFP4 (gpt-oss as released), which --quantize "
                             "int8|int4 does not convert: pack without --quantize (the store "
                             "keeps them MXFP4), or quantize a bf16 checkpoint",
                             m->dir);
    if (m->expert_quant.q != MOE_QUANT_NONE && m->expert_quant.q != MOE_QUANT_FP8)
        return moe_error_set(err, -EINVAL,
                             "%s: its experts are already %s: quantize from the bf16, f16, f32 "
                             "or fp8 checkpoint",
                             m->dir, moe_quant_name(m->expert_quant.q));
    for (int i = 0; i < m->cfg.n_layers; i++) {
        const struct moe_layer *L = &m->layers[i];

        for (int e = -1; L->is_moe && e < m->cfg.n_experts; e++) {
            const struct moe_expert_ref *x = e < 0 ? &L->shared : &L->experts[e];
            const struct moe_tensor_ref *t[6];

            if (e < 0 && !L->has_shared)
                continue;
            moe_expert_tensors(x, t);
            for (int k = 0; k < 3; k++)
                if (t[k]->cols % q->bcols != 0 || t[k]->rows % 32 != 0)
                    return moe_error_set(err, -EINVAL,
                                         "%s: tensor '%s' [%" PRId64 ", %" PRId64
                                         "]: --group %d must divide its columns, and its rows "
                                         "must be a multiple of 32",
                                         m->dir, t[k]->name, t[k]->rows, t[k]->cols, q->bcols);
        }
    }
    return 0;
}

int moe_pack_default_group(const struct moe_model *m, enum moe_quant q)
{
    int want = q == MOE_QUANT_INT8 ? MOE_QUANT_INT8_GROUP : MOE_QUANT_INT4_GROUP;

    for (int g = want; g >= 32; g /= 2) {
        struct moe_quant_fmt f = {q, 1, g};

        if (check_quantize(m, &f, NULL) == 0)
            return g;
    }
    return want;
}

int moe_pack_write_quant(const struct moe_model *m, const char *out_dir, bool overwrite,
                         const struct moe_quant_fmt *quant, moe_pack_progress_fn progress,
                         void *ctx, struct moe_error *err)
{
    struct writer w = {.m = m, .fd = -1, .err = err};
    struct qopts q = {{0}};
    /* --quantize: the current expert's quantized values and scales */
    uint8_t *qv = NULL;
    float *qs[3] = {NULL, NULL, NULL};
    size_t qv_cap = 0, qs_cap[3] = {0, 0, 0};
    XXH3_state_t *ts = XXH3_createState(), *es = XXH3_createState();
    struct item *items = NULL;
    uint8_t *xbuf = NULL; /* a transposed expert made plain */
    size_t xcap = 0;
    json_t *root = NULL, *tensors, *experts;
    char *data_path = NULL, *cfg_path = NULL, *cfg = NULL, *text = NULL, hex[17];
    /* What a failure removes: only what this call wrote. */
    bool made_dir = false, wrote_cfg = false, wrote_data = false, wrote_index = false;
    size_t n_items = 0, cap_items, cfg_len;
    uint64_t data_bytes;
    int r;

    if (!ts || !es) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    if (quant && quant->q != MOE_QUANT_NONE) {
        q.f = *quant;
        r = check_quantize(m, &q.f, err);
        if (r < 0)
            goto fail;
    }
    /* A transposed expert (Llama 4's, gpt-oss's) is made plain on the way,
     * then quantized row by row like a plain one; only from plain weights
     * (check_quantize takes FP8 sources, which are never transposed). */
    for (int i = 0; q.f.q != MOE_QUANT_NONE && i < m->cfg.n_layers; i++) {
        if (m->layers[i].is_moe && m->layers[i].experts[0].transposed &&
            m->layers[i].experts[0].quant.q != MOE_QUANT_NONE) {
            r = moe_error_set(err, -ENOTSUP,
                              "%s: layer %d: %s's experts are stored transposed and %s, which "
                              "--quantize cannot read; pack without --quantize",
                              m->dir, i, moe_arch_name(m->cfg.arch),
                              moe_quant_name(m->layers[i].experts[0].quant.q));
            goto fail;
        }
    }
    r = make_dirs(out_dir, &made_dir, err);
    if (r < 0)
        goto fail;
    r = check_out_dir(m, out_dir, overwrite, err);
    if (r < 0)
        goto fail;

    /* config.json, byte for byte. */
    cfg_path = path_join(m->dir, CONFIG_NAME);
    if (!cfg_path) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    r = moe_read_file(cfg_path, CONFIG_MAX_BYTES, &cfg, &cfg_len, err);
    if (r < 0)
        goto fail;
    wrote_cfg = true;
    r = write_file_atomic(out_dir, CONFIG_NAME, cfg, cfg_len, err);
    if (r < 0)
        goto fail;

    /* Routed experts: 3 or 6 tensors each; others: at most PACK_OTHERS_MAX per layer. */
    cap_items = (size_t)m->n_moe_layers * ((size_t)m->cfg.n_experts * 6 + PACK_OTHERS_MAX);
    items = calloc(cap_items ? cap_items : 1, sizeof(*items));
    if (!items) {
        r = moe_error_set(err, -ENOMEM, "out of memory for %zu tensors", cap_items);
        goto fail;
    }
    n_items = plan(m, &q, items, &data_bytes);
    root = index_root(m, data_bytes);
    if (!root) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    if (q.f.q != MOE_QUANT_NONE &&
        json_object_set_new(
            root, "quantization",
            json_pack("{s:s, s:i}", "format", moe_quant_name(q.f.q), "group", q.f.bcols)) < 0) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    tensors = json_object_get(root, "tensors");
    experts = json_object_get(root, "experts");

    data_path = path_join(out_dir, MOE_PACK_DATA);
    w.cap = IO_BYTES;
    w.buf = moe_alloc_aligned(w.cap);
    if (!data_path || !w.buf) {
        r = moe_error_set(err, -ENOMEM, "out of memory for a %zu-byte buffer", w.cap);
        goto fail;
    }
    w.path = data_path;
    wrote_data = true;
    w.fd = open(data_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (w.fd < 0) {
        r = moe_error_set(err, -errno, "%s: cannot create: %s", data_path, strerror(errno));
        goto fail;
    }
    for (size_t i = 0; i < n_items; i++) {
        const struct item *it = &items[i];
        bool first = it->expert >= 0 && it->part == 0;
        bool last = it->expert >= 0 && it->part == it->n_parts - 1;

        r = w_pad(&w, it->offset);
        if (r < 0)
            goto fail;
        XXH3_64bits_reset(ts);
        if (first)
            XXH3_64bits_reset(es);
        if (it->quantize && it->part < 3 && it->expert >= 0 &&
            m->layers[it->layer].experts[it->expert].transposed) {
            /* a transposed expert: read whole, made plain, then each part
             * quantized from the plain copy */
            const struct moe_expert_ref *x = &m->layers[it->layer].experts[it->expert];
            int k = it->part;
            uint64_t off = k == MOE_PART_GATE ? 0
                           : k == MOE_PART_UP ? x->gate.nbytes
                                              : x->gate.nbytes + x->up.nbytes;
            size_t sn = (size_t)(it->t->rows * (it->t->cols / q.f.bcols)) * sizeof(float);

            r = first ? read_plain_expert(m, x, &xbuf, &xcap, err) : 0;
            if (r < 0)
                goto fail;
            r = grow((void **)&qv, &qv_cap, it->nbytes, it->t->name, err);
            if (r == 0)
                r = grow((void **)&qs[k], &qs_cap[k], sn, it->t->name, err);
            if (r < 0)
                goto fail;
            r = quantize_plain(m, x, k, xbuf + off, &q.f, qv, qs[k], err);
            if (r == 0)
                r = w_bytes(&w, qv, it->nbytes, ts, es);
        } else if (!it->quantize && it->expert >= 0 &&
                   needs_plain(&m->layers[it->layer].experts[it->expert])) {
            /* A store holds plain experts: a transposed one (Llama 4's,
             * gpt-oss's) or one with interleaved gate and up rows
             * (gpt-oss's MXFP4, values and scales) is read whole and made
             * plain on the way. */
            const struct moe_expert_ref *x = &m->layers[it->layer].experts[it->expert];
            uint64_t off = plain_part_off(x, it->part);

            r = first ? read_plain_expert(m, x, &xbuf, &xcap, err) : 0;
            if (r == 0)
                r = w_bytes(&w, xbuf + off, it->t->nbytes, ts, es);
        } else if (it->quantize && it->part < 3) {
            /* values now, scales kept for their own item after down */
            int k = it->part;
            size_t sn = (size_t)(it->t->rows * (it->t->cols / q.f.bcols)) * sizeof(float);

            r = grow((void **)&qv, &qv_cap, it->nbytes, it->t->name, err);
            if (r == 0)
                r = grow((void **)&qs[k], &qs_cap[k], sn, it->t->name, err);
            if (r < 0)
                goto fail;
            r = quantize_part(m, it->x, k, &q.f, qv, qs[k], err);
            if (r == 0)
                r = w_bytes(&w, qv, it->nbytes, ts, it->expert >= 0 ? es : NULL);
        } else if (it->quantize) {
            r = w_bytes(&w, (const uint8_t *)qs[it->part - 3], it->nbytes, ts,
                        it->expert >= 0 ? es : NULL);
        } else {
            r = w_tensor(&w, it->t, ts, it->expert >= 0 ? es : NULL);
        }
        if (r < 0)
            goto fail;
        if ((it->quantize ? index_add_quantized(m, &q, tensors, it, XXH3_64bits_digest(ts))
                          : index_add_tensor(m, tensors, it, XXH3_64bits_digest(ts))) < 0) {
            r = moe_error_set(err, -ENOMEM, "out of memory");
            goto fail;
        }
        if (last) {
            const struct item *f0 = &items[i - (size_t)(it->n_parts - 1)];
            json_t *e;

            hex64(XXH3_64bits_digest(es), hex);
            e = json_pack("{s:i, s:i, s:I, s:I, s:s}", "layer", it->layer, "expert", it->expert,
                          "offset", (json_int_t)f0->offset, "nbytes",
                          (json_int_t)(it->offset + it->nbytes - f0->offset), "xxh3", hex);
            if (!e || json_array_append_new(experts, e) < 0) {
                r = moe_error_set(err, -ENOMEM, "out of memory");
                goto fail;
            }
        }
        if (progress && (it->expert < 0 || last))
            progress(ctx, w.pos + w.fill, data_bytes);
    }
    r = w_pad(&w, data_bytes);
    if (r == 0)
        r = w_flush(&w);
    if (r < 0)
        goto fail;
    if (progress)
        progress(ctx, data_bytes, data_bytes);
    if (fsync(w.fd) < 0) {
        r = moe_error_set(err, -errno, "%s: fsync failed: %s", data_path, strerror(errno));
        goto fail;
    }
    if (close(w.fd) < 0) {
        w.fd = -1;
        r = moe_error_set(err, -errno, "%s: close failed: %s", data_path, strerror(errno));
        goto fail;
    }
    w.fd = -1;

    /* The index last: its presence says the store is complete. */
    text = json_dumps(root, JSON_INDENT(1));
    if (!text) {
        r = moe_error_set(err, -ENOMEM, "out of memory for the index");
        goto fail;
    }
    wrote_index = true;
    r = write_file_atomic(out_dir, MOE_PACK_INDEX, text, strlen(text), err);
    if (r == 0)
        r = fsync_dir(out_dir, err);
    if (r < 0)
        goto fail;
    r = 0;
    goto out;
fail:
    if (w.fd >= 0)
        close(w.fd);
    w.fd = -1;
    if (wrote_index)
        unlink_in(out_dir, MOE_PACK_INDEX);
    if (wrote_data)
        unlink_in(out_dir, MOE_PACK_DATA);
    if (wrote_cfg)
        unlink_in(out_dir, CONFIG_NAME);
    if (made_dir)
        rmdir(out_dir);
out:
    free(qv);
    for (int k = 0; k < 3; k++)
        free(qs[k]);
    free(text);
    json_decref(root);
    moe_free_aligned(w.buf);
    free(data_path);
    free(cfg);
    free(cfg_path);
    free(items);
    free(xbuf);
    XXH3_freeState(ts);
    XXH3_freeState(es);
    return r;
}

/* ---- verifying ------------------------------------------------------------- */

/* A tensor of the index being verified. */
struct vtensor {
    const struct moe_st_tensor *t; /* in the index */
    uint64_t xxh3;                 /* what the index says */
    uint64_t got;                  /* what experts.bin has, once read */
    int ck_file;                   /* checkpoint file, -1: not compared */
    uint64_t ck_offset;            /* in that file */
    bool differs;                  /* content differs from the checkpoint */
    uint64_t differs_at;           /* first differing byte, from the tensor's start */
    bool bad;                      /* counted as a mismatch */
    /* A part of a transposed checkpoint expert: compared with the expert
     * made plain (ck_file and ck_offset unused), or NULL. */
    const struct moe_expert_ref *ck_x;
    uint64_t ck_part_off; /* the part's offset in the plain expert */
};

struct verifier {
    const struct moe_model *ck; /* NULL: no checkpoint */
    struct moe_pack_report rep;
    bool have_first;
    uint64_t first_at; /* offset in experts.bin of the mismatch in err */
    struct moe_error *err;
    const struct moe_expert_ref *plain_x; /* the checkpoint expert in plain, or NULL */
    uint8_t *plain;                       /* its bytes made plain, owned */
    size_t plain_cap;                     /* bytes at plain */
};

static int cmp_vtensor_offset(const void *a, const void *b)
{
    const struct vtensor *x = a, *y = b;

    if (x->t->offset != y->t->offset)
        return x->t->offset < y->t->offset ? -1 : 1;
    return x->t->nbytes < y->t->nbytes ? -1 : x->t->nbytes > y->t->nbytes;
}

static void mismatch_at(struct verifier *v, uint64_t at, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Keeps, as err, the message of the mismatch at the lowest offset. */
static void mismatch_at(struct verifier *v, uint64_t at, const char *fmt, ...)
{
    va_list ap;

    if (v->have_first && at >= v->first_at)
        return;
    v->have_first = true;
    v->first_at = at;
    if (!v->err)
        return;
    v->err->code = -EBADMSG;
    va_start(ap, fmt);
    vsnprintf(v->err->msg, sizeof(v->err->msg), fmt, ap);
    va_end(ap);
}

/* What is wrong with a tensor read in full, in buf; false when nothing. */
static bool tensor_problem(const struct verifier *v, const struct vtensor *t, char *buf, size_t len)
{
    char h1[17], h2[17];

    if (t->got != t->xxh3) {
        hex64(t->xxh3, h1);
        hex64(t->got, h2);
        snprintf(buf, len, "tensor '%s': checksum mismatch: index says %s, %s has %s", t->t->name,
                 h1, MOE_PACK_DATA, h2);
        return true;
    }
    if (t->differs) {
        snprintf(buf, len,
                 "tensor '%s': differs from the checkpoint's (%s) at byte %" PRIu64
                 " of the tensor",
                 t->t->name, v->ck->files[t->ck_x ? t->ck_x->gate.file : t->ck_file].path,
                 t->differs_at);
        return true;
    }
    return false;
}

/* Compares bytes [at, at + n) of tensor t (data in buf) with the checkpoint. */
static int compare_piece(struct verifier *v, struct vtensor *t, uint64_t at, const uint8_t *buf,
                         size_t n, uint8_t *ckbuf)
{
    const struct moe_model_file *f;
    int64_t got;

    if (t->ck_x && !t->differs) {
        if (v->plain_x != t->ck_x) {
            int r;

            v->plain_x = NULL;
            r = read_plain_expert(v->ck, t->ck_x, &v->plain, &v->plain_cap, v->err);
            if (r < 0)
                return r;
            v->plain_x = t->ck_x;
        }
        memcpy(ckbuf, v->plain + t->ck_part_off + at, n);
        got = (int64_t)n;
        f = &v->ck->files[t->ck_x->gate.file];
        goto compare;
    }
    if (t->ck_file < 0 || t->differs)
        return 0;
    f = &v->ck->files[t->ck_file];
    got = moe_pread_full(f->fd, ckbuf, n, t->ck_offset + at);
    if (got < 0)
        return moe_error_set(v->err, (int)got, "%s: tensor '%s': read failed: %s", f->path,
                             t->t->name, strerror((int)-got));
    if ((size_t)got < n)
        return moe_error_set(v->err, -EIO,
                             "%s: tensor '%s': short read: file truncated since it was "
                             "opened?",
                             f->path, t->t->name);
compare:
    if (memcmp(buf, ckbuf, n) != 0) {
        size_t k = 0;

        while (k < n && buf[k] == ckbuf[k])
            k++;
        t->differs = true;
        t->differs_at = at + k;
    }
    return 0;
}

/* Looks a MoE tensor of the checkpoint up in the store's index; a slice of
 * a fused tensor (expert, part) under its per-expert name, its scales
 * (part 3 to 5, MXFP4) under that name and the scale suffix of sq. */
static void want_in_store(struct verifier *v, const struct moe_st_header *h, int layer, int expert,
                          int part, const struct moe_tensor_ref *t, enum moe_quant sq)
{
    char name[300], base[256];
    const char *key = t->name;

    if (t->slice) {
        moe_model_expert_tensor_name(v->ck, layer, expert, (enum moe_expert_part)(part % 3), base,
                                     sizeof(base));
        snprintf(name, sizeof(name), "%s%s", base, part >= 3 ? moe_quant_scale_suffix(sq) : "");
        key = name;
    }
    if (moe_st_header_find(h, key))
        return;
    v->rep.mismatches++;
    mismatch_at(v, UINT64_MAX, "layer %d: the checkpoint's tensor '%s' is not in the store", layer,
                key);
}

/*
 * The checkpoint's part of a routed expert stored as a slice of a fused
 * tensor that the store names name: its per-expert name (gate, up, down),
 * or that name and "_scale" (their scales: MXFP4).  Sets *ret_x to the
 * expert and *ret_k to the part (0..5, moe_expert_tensors' order); NULL
 * when name is no such part.
 */
static const struct moe_tensor_ref *ck_expert_part(const struct moe_model *ck, const char *name,
                                                   const struct moe_expert_ref **ret_x, int *ret_k)
{
    const char *suf = moe_quant_scale_suffix(MOE_QUANT_MXFP4);
    size_t n = strlen(name), ns = strlen(suf);
    const struct moe_tensor_ref *t = moe_model_find_expert_tensor(ck, name), *parts[6];
    bool scale = false;
    char base[300];

    if (!t && n > ns && n - ns < sizeof(base) && strcmp(name + n - ns, suf) == 0) {
        memcpy(base, name, n - ns);
        base[n - ns] = 0;
        t = moe_model_find_expert_tensor(ck, base);
        scale = true;
    }
    if (!t || !t->slice)
        return NULL;
    for (int i = 0; i < ck->cfg.n_layers; i++) {
        const struct moe_layer *L = &ck->layers[i];
        uintptr_t p = (uintptr_t)t, a, b;
        const struct moe_expert_ref *x;
        int k;

        if (!L->is_moe)
            continue;
        a = (uintptr_t)L->experts;
        b = (uintptr_t)(L->experts + ck->cfg.n_experts);
        if (p < a || p >= b)
            continue;
        x = &L->experts[(p - a) / sizeof(*L->experts)];
        k = t == &x->gate ? 0 : t == &x->up ? 1 : 2;
        if (scale) {
            if (moe_expert_tensors(x, parts) != 6 || x->quant.q != MOE_QUANT_MXFP4)
                return NULL;
            k += 3;
            t = parts[k];
        }
        *ret_x = x;
        *ret_k = k;
        return t;
    }
    return NULL;
}

/*
 * Compares config.json; looks up every tensor of the store in the checkpoint
 * (same dtype and shape) and every MoE tensor of the checkpoint in the store.
 * Mismatches are recorded; -errno only when a file cannot be read.
 */
/* True when t is a quantized expert tensor of a store packed with
 * --quantize q: its values (dtype of q) or its scales ("..._scale"). */
static bool quantized_in_store(const struct moe_quant_fmt *q, const struct moe_st_tensor *t)
{
    const char *suf = moe_quant_scale_suffix(q->q);
    size_t n = strlen(t->name), k = strlen(suf);

    if (q->q == MOE_QUANT_NONE)
        return false;
    return t->dtype == moe_quant_value_dtype(q->q) ||
           (n > k && strcmp(t->name + n - k, suf) == 0 && t->dtype == MOE_DTYPE_F32);
}

static int match_checkpoint(struct verifier *v, const char *pack_dir, const char *ck_dir,
                            struct vtensor *vt, size_t nt, const struct moe_st_header *h,
                            const struct moe_quant_fmt *q)
{
    const struct moe_model *ck = v->ck;
    char *p1 = path_join(pack_dir, CONFIG_NAME), *p2 = path_join(ck_dir, CONFIG_NAME);
    char *c1 = NULL, *c2 = NULL, s1[128], s2[128];
    size_t l1, l2;
    int r;

    if (!p1 || !p2) {
        r = moe_error_set(v->err, -ENOMEM, "out of memory");
        goto out;
    }
    r = moe_read_file(p1, CONFIG_MAX_BYTES, &c1, &l1, v->err);
    if (r == 0)
        r = moe_read_file(p2, CONFIG_MAX_BYTES, &c2, &l2, v->err);
    if (r < 0)
        goto out;
    if (l1 != l2 || memcmp(c1, c2, l1) != 0) {
        v->rep.mismatches++;
        mismatch_at(v, 0, "%s differs from the checkpoint's %s", p1, p2);
    }

    for (size_t i = 0; i < nt; i++) {
        struct vtensor *t = &vt[i];
        const struct moe_st_tensor *c = NULL;
        size_t f;

        /* checked by quantizing the checkpoint's again (check_requantized) */
        if (quantized_in_store(q, t->t))
            continue;
        for (f = 0; f < ck->n_files && !c; f++)
            c = moe_st_header_find(ck->headers[f], t->t->name);
        if (!c) {
            /* An expert's part, from a fused tensor of the checkpoint. */
            const struct moe_expert_ref *xe = NULL;
            int k = 0;
            const struct moe_tensor_ref *x = ck_expert_part(ck, t->t->name, &xe, &k);

            if (x) {
                int64_t shape[2] = {x->rows, stored_cols(x)};

                if (x->dtype != t->t->dtype || t->t->ndim != 2 ||
                    memcmp(shape, t->t->shape, sizeof(shape)) != 0) {
                    t->bad = true;
                    v->rep.mismatches++;
                    mismatch_at(v, t->t->offset,
                                "tensor '%s': %s %s in the store, %s %s in the checkpoint's "
                                "'%s'",
                                t->t->name, moe_dtype_name(t->t->dtype),
                                moe_shape_text(t->t->shape, t->t->ndim, s1, sizeof(s1)),
                                moe_dtype_name(x->dtype), moe_shape_text(shape, 2, s2, sizeof(s2)),
                                x->name);
                    continue;
                }
                if (needs_plain(xe)) {
                    /* The store holds it plain: compared with the
                     * checkpoint's expert made plain, not with its bytes. */
                    t->ck_x = xe;
                    t->ck_part_off = plain_part_off(xe, k);
                } else {
                    t->ck_file = x->file;
                    t->ck_offset = x->offset;
                }
                continue;
            }
        }
        if (!c) {
            t->bad = true;
            v->rep.mismatches++;
            mismatch_at(v, t->t->offset, "tensor '%s' is in the store but not in the checkpoint %s",
                        t->t->name, ck_dir);
            continue;
        }
        if (c->dtype != t->t->dtype || c->ndim != t->t->ndim ||
            memcmp(c->shape, t->t->shape, sizeof(c->shape[0]) * (size_t)c->ndim) != 0) {
            t->bad = true;
            v->rep.mismatches++;
            mismatch_at(v, t->t->offset, "tensor '%s': %s %s in the store, %s %s in the checkpoint",
                        t->t->name, moe_dtype_name(t->t->dtype),
                        moe_shape_text(t->t->shape, t->t->ndim, s1, sizeof(s1)),
                        moe_dtype_name(c->dtype),
                        moe_shape_text(c->shape, c->ndim, s2, sizeof(s2)));
            continue;
        }
        t->ck_file = (int)(f - 1);
        t->ck_offset = c->offset;
    }

    for (int i = 0; i < ck->cfg.n_layers; i++) {
        const struct moe_layer *L = &ck->layers[i];

        if (!L->is_moe)
            continue;
        want_in_store(v, h, i, -1, -1, &L->router, MOE_QUANT_NONE);
        if (L->has_bias)
            want_in_store(v, h, i, -1, -1, &L->bias, MOE_QUANT_NONE);
        if (L->has_shared) {
            want_in_store(v, h, i, -1, -1, &L->shared.gate, MOE_QUANT_NONE);
            want_in_store(v, h, i, -1, -1, &L->shared.up, MOE_QUANT_NONE);
            want_in_store(v, h, i, -1, -1, &L->shared.down, MOE_QUANT_NONE);
        }
        if (L->has_shared_gate)
            want_in_store(v, h, i, -1, -1, &L->shared_gate, MOE_QUANT_NONE);
        if (L->has_router_bias)
            want_in_store(v, h, i, -1, -1, &L->router_bias, MOE_QUANT_NONE);
        if (L->has_expert_bias) {
            want_in_store(v, h, i, -1, -1, &L->gate_up_bias, MOE_QUANT_NONE);
            want_in_store(v, h, i, -1, -1, &L->down_bias, MOE_QUANT_NONE);
        }
        for (int e = 0; e < ck->cfg.n_experts; e++) {
            const struct moe_expert_ref *x = &L->experts[e];
            const struct moe_tensor_ref *xt[6];
            int nx = moe_expert_tensors(x, xt);

            /* gate, up, down; a sliced expert's scales too (MXFP4) */
            for (int k = 0; k < (x->gate.slice ? nx : 3); k++)
                want_in_store(v, h, i, e, k, xt[k], x->quant.q);
        }
    }
    r = 0;
out:
    free(c1);
    free(c2);
    free(p1);
    free(p2);
    return r;
}

/*
 * A store packed with --quantize q, against its checkpoint: each expert
 * matrix quantized again from the checkpoint must give the store's values
 * and scales exactly (quantizing is deterministic).  Mismatches are
 * recorded; -errno only when a file cannot be read.
 */
static int check_requantized(struct verifier *v, const struct moe_model *pm,
                             const struct moe_quant_fmt *q)
{
    const struct moe_model *ck = v->ck;
    uint8_t *want = NULL, *got = NULL;
    float *ws = NULL;
    uint8_t *gs = NULL;
    /* a transposed checkpoint expert made plain */
    const struct moe_expert_ref *plain_x = NULL;
    uint8_t *plain = NULL;
    size_t plain_cap = 0;
    int r = 0;

    if (pm->cfg.n_layers != ck->cfg.n_layers || pm->cfg.n_experts != ck->cfg.n_experts)
        return 0; /* config.json differs: already a mismatch */
    for (int i = 0; i < ck->cfg.n_layers; i++) {
        const struct moe_layer *L = &ck->layers[i], *P = &pm->layers[i];

        for (int e = -1; L->is_moe && P->is_moe && e < ck->cfg.n_experts; e++) {
            const struct moe_expert_ref *x = e < 0 ? &L->shared : &L->experts[e];
            const struct moe_expert_ref *y = e < 0 ? &P->shared : &P->experts[e];
            const struct moe_tensor_ref *yt[6];

            if (e < 0 && (!L->has_shared || !P->has_shared))
                continue;
            if (y->quant.q != q->q || moe_expert_tensors(y, yt) != 6)
                continue; /* the store's structure check reports it */
            for (int k = 0; k < 3; k++) {
                const struct moe_tensor_ref *xk = k == 0 ? &x->gate : k == 1 ? &x->up : &x->down;
                uint64_t vb = yt[k]->nbytes, sb = yt[k + 3]->nbytes;

                /* shapes checked against config.json on both sides */
                if (yt[k]->rows != xk->rows || yt[k]->cols != xk->cols ||
                    sb != (uint64_t)xk->rows * (uint64_t)(xk->cols / q->bcols) * 4)
                    continue;
                free(want);
                free(got);
                free(ws);
                free(gs);
                want = malloc(vb);
                got = malloc(vb);
                ws = malloc(sb);
                gs = malloc(sb);
                if (!want || !got || !ws || !gs) {
                    r = moe_error_set(v->err, -ENOMEM, "out of memory");
                    goto out;
                }
                if (x->transposed) {
                    /* made plain once per expert, then quantized as pack does */
                    uint64_t off = k == 0   ? 0
                                   : k == 1 ? x->gate.nbytes
                                            : x->gate.nbytes + x->up.nbytes;

                    r = plain_x == x ? 0 : read_plain_expert(ck, x, &plain, &plain_cap, v->err);
                    plain_x = r == 0 ? x : NULL;
                    if (r == 0)
                        r = quantize_plain(ck, x, k, plain + off, q, want, ws, v->err);
                } else {
                    r = quantize_part(ck, x, k, q, want, ws, v->err);
                }
                if (r == 0)
                    r = moe_model_read(pm, yt[k], got, v->err);
                if (r == 0)
                    r = moe_model_read(pm, yt[k + 3], gs, v->err);
                if (r < 0)
                    goto out;
                for (int j = 0; j < 2; j++) {
                    const struct moe_tensor_ref *t = yt[k + 3 * j];
                    const void *a = j ? (const void *)ws : want, *b = j ? (const void *)gs : got;

                    v->rep.tensors_checked++;
                    if (memcmp(a, b, j ? sb : vb) == 0)
                        continue;
                    v->rep.mismatches++;
                    mismatch_at(v, t->offset,
                                "tensor '%s': differs from the %s quantization (group %d) of the "
                                "checkpoint's '%s'",
                                t->name, moe_quant_name(q->q), q->bcols, xk->name);
                }
            }
        }
    }
out:
    free(want);
    free(got);
    free(ws);
    free(gs);
    free(plain);
    return r;
}

/* Reports a routed expert's blob read in full; first_bad: its first bad
 * tensor, or NULL. */
static void blob_done(struct verifier *v, const struct moe_pack_entry *x, uint64_t got,
                      const struct vtensor *first_bad)
{
    char why[MOE_ERROR_MSG_MAX / 2] = "", h1[17], h2[17];

    if (first_bad)
        tensor_problem(v, first_bad, why, sizeof(why));
    if (got != x->xxh3) {
        /* The bad tensor, if any, was counted: one mismatch, not two. */
        if (!first_bad)
            v->rep.mismatches++;
        hex64(x->xxh3, h1);
        hex64(got, h2);
        mismatch_at(v, x->offset,
                    "layer %d expert %d: checksum mismatch: index says %s, %s has %s%s%s%s",
                    x->layer, x->expert, h1, MOE_PACK_DATA, h2, first_bad ? " (" : "", why,
                    first_bad ? ")" : "");
    } else if (first_bad) {
        mismatch_at(v, x->offset, "layer %d expert %d: %s", x->layer, x->expert, why);
    }
    v->rep.experts_checked++;
}

int moe_pack_verify(const char *pack_dir, const char *checkpoint_dir, struct moe_pack_report *rep,
                    moe_pack_progress_fn progress, void *ctx, struct moe_error *err)
{
    struct verifier v = {.err = err};
    struct moe_pack_index ix = {0};
    struct moe_model *pm = NULL, *ck = NULL;
    struct vtensor *vt = NULL;
    const struct vtensor **blob_bad = NULL; /* [n_experts]: first bad tensor of each blob */
    XXH3_state_t *ts = XXH3_createState(), *es = XXH3_createState();
    uint8_t *buf = NULL, *ckbuf = NULL;
    size_t nt = 0, ne, ti = 0, xj = 0, ei = 0;
    const char *data_path;
    int fd, r;

    if (!ts || !es) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    /* Structure first: everything moe_model_open checks for serving. */
    r = moe_model_open(pack_dir, &pm, err);
    if (r < 0)
        goto out;
    if (!pm->packed) {
        r = moe_error_set(err, -EINVAL, "%s: no %s: not a packed store (moectl pack writes one)",
                          pack_dir, MOE_PACK_INDEX);
        goto out;
    }
    r = index_read(pack_dir, &ix, err);
    if (r < 0)
        goto out;
    if (checkpoint_dir) {
        r = moe_model_open(checkpoint_dir, &ck, err);
        if (r < 0)
            goto out;
        v.ck = ck;
    }
    data_path = pm->files[0].path;
    fd = pm->files[0].fd;
    if (pm->files[0].size != ix.data_bytes) {
        r = moe_error_set(err, -EINVAL,
                          "%s: %" PRIu64 " bytes, but %s says data_bytes %" PRIu64
                          ": changed while being verified?",
                          data_path, pm->files[0].size, MOE_PACK_INDEX, ix.data_bytes);
        goto out;
    }

    nt = ix.tensors->n_tensors;
    ne = ix.n_experts;
    vt = calloc(nt, sizeof(*vt));
    blob_bad = calloc(ne, sizeof(*blob_bad));
    buf = moe_alloc_aligned(IO_BYTES);
    if (ck)
        ckbuf = moe_alloc_aligned(IO_BYTES);
    if (!vt || !blob_bad || !buf || (ck && !ckbuf)) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < nt; i++) {
        vt[i].t = &ix.tensors->tensors[i];
        vt[i].xxh3 = ix.tensor_xxh3[i];
        vt[i].ck_file = -1;
    }
    if (ck) {
        r = match_checkpoint(&v, pack_dir, checkpoint_dir, vt, nt, ix.tensors, &ix.quant);
        if (r < 0)
            goto out;
        if (ix.quant.q != MOE_QUANT_NONE) {
            r = check_requantized(&v, pm, &ix.quant);
            if (r < 0)
                goto out;
        }
    }
    /* Tensors and blobs in file order, as experts.bin is read (the index
     * keeps blobs by key; nothing looks them up below). */
    qsort(vt, nt, sizeof(*vt), cmp_vtensor_offset);
    qsort(ix.experts, ne, sizeof(*ix.experts), moe_pack_entry_cmp_offset);

    XXH3_64bits_reset(ts);
    XXH3_64bits_reset(es);
    for (uint64_t a = 0;; a += IO_BYTES) {
        uint64_t b = MOE_MIN(a + IO_BYTES, ix.data_bytes);
        int64_t got;

        got = moe_pread_full(fd, buf, (size_t)(b - a), a);
        if (got < 0) {
            r = moe_error_set(err, (int)got, "%s: read at offset %" PRIu64 " failed: %s", data_path,
                              a, strerror((int)-got));
            goto out;
        }
        if ((uint64_t)got < b - a) {
            r = moe_error_set(err, -EIO,
                              "%s: short read at offset %" PRIu64
                              ": file truncated since it was opened?",
                              data_path, a + (uint64_t)got);
            goto out;
        }
        v.rep.bytes_checked += b - a;

        /* Every tensor starting before b (at b, if b is the end: an empty
         * tensor there), up to the first that runs on past b. */
        while (ti < nt && (vt[ti].t->offset < b || b == ix.data_bytes)) {
            struct vtensor *t = &vt[ti];
            uint64_t end = t->t->offset + t->t->nbytes, s = MOE_MAX(a, t->t->offset),
                     e = MOE_MIN(b, end);
            char why[MOE_ERROR_MSG_MAX / 2];

            if (e > s) {
                XXH3_64bits_update(ts, buf + (s - a), (size_t)(e - s));
                r = compare_piece(&v, t, s - t->t->offset, buf + (s - a), (size_t)(e - s), ckbuf);
                if (r < 0)
                    goto out;
            }
            if (end > b)
                break;
            t->got = XXH3_64bits_digest(ts);
            XXH3_64bits_reset(ts);
            v.rep.tensors_checked++;
            ti++;
            if (!tensor_problem(&v, t, why, sizeof(why)))
                continue;
            if (!t->bad)
                v.rep.mismatches++;
            t->bad = true;
            /* Inside a routed expert's blob: reported with the blob. */
            while (xj < ne && ix.experts[xj].offset + ix.experts[xj].nbytes <= t->t->offset)
                xj++;
            if (xj < ne && ix.experts[xj].offset <= t->t->offset &&
                end <= ix.experts[xj].offset + ix.experts[xj].nbytes) {
                if (!blob_bad[xj])
                    blob_bad[xj] = t;
            } else {
                mismatch_at(&v, t->t->offset, "%s", why);
            }
        }
        while (ei < ne && ix.experts[ei].offset < b) {
            const struct moe_pack_entry *x = &ix.experts[ei];
            uint64_t end = x->offset + x->nbytes, s = MOE_MAX(a, x->offset), e = MOE_MIN(b, end);

            XXH3_64bits_update(es, buf + (s - a), (size_t)(e - s));
            if (end > b)
                break;
            blob_done(&v, x, XXH3_64bits_digest(es), blob_bad[ei]);
            XXH3_64bits_reset(es);
            ei++;
            if (progress)
                progress(ctx, end, ix.data_bytes);
        }
        if (progress)
            progress(ctx, b, ix.data_bytes);
        if (b == ix.data_bytes)
            break;
    }
    r = v.rep.mismatches > 0 ? -EBADMSG : 0;
out:
    if (rep)
        *rep = v.rep;
    moe_free_aligned(buf);
    moe_free_aligned(ckbuf);
    free(v.plain);
    free(blob_bad);
    free(vt);
    moe_pack_index_clear(&ix);
    moe_model_free(pm);
    moe_model_free(ck);
    XXH3_freeState(ts);
    XXH3_freeState(es);
    return r;
}
