/*
 * Streaming safetensors writer: owns the output file from init to finish, the
 * list of declared tensors and one write buffer.
 *
 * Invariants: tensors are declared before the header is written and never
 * after; data_written <= data_size; the file is removed by free() unless
 * finish() succeeded, so a failed writer leaves no half-written checkpoint.
 */
#include "st_writer.h"
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define WRITE_BUF_SIZE (4u << 20)

struct st_tensor {
    char *name; /* owned */
    enum moe_dtype dtype;
    int ndim;
    int64_t shape[MOE_MAX_DIMS];
    uint64_t begin; /* data offset of the first byte */
    uint64_t end;   /* data offset past the last byte */
};

struct moe_st_writer {
    char *path; /* owned */
    int fd;     /* -1 once closed */
    size_t n, cap;
    struct st_tensor *tensors; /* [n], declaration order = data order */
    uint64_t data_size;        /* sum of the tensors' bytes */
    uint64_t data_written;     /* bytes passed to moe_st_writer_write() */
    bool begun;                /* header written: no more add() */
    bool finished;             /* finish() succeeded: keep the file */
    unsigned char *buf;        /* WRITE_BUF_SIZE bytes, owned */
    size_t buf_len;            /* bytes pending in buf */
};

/* write(2) until done; -errno on failure (a zero-byte write is -EIO). */
static int write_all(int fd, const void *data, size_t len)
{
    const unsigned char *p = data;

    while (len > 0) {
        ssize_t r = write(fd, p, MOE_MIN(len, (size_t)1 << 30));

        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO;
        p += r;
        len -= (size_t)r;
    }
    return 0;
}

static int io_error(struct moe_st_writer *w, int r, struct moe_error *err)
{
    return moe_error_set(err, r, "writing '%s': %s", w->path, strerror(-r));
}

int moe_st_writer_init(const char *path, struct moe_st_writer **ret, struct moe_error *err)
{
    struct moe_st_writer *w = calloc(1, sizeof(*w));
    int r;

    if (!w)
        return moe_error_set(err, -ENOMEM, "out of memory");
    w->fd = -1;
    w->path = strdup(path);
    w->buf = malloc(WRITE_BUF_SIZE);
    if (!w->path || !w->buf) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto out_free;
    }
    w->fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (w->fd < 0) {
        r = -errno;
        moe_error_set(err, r, "cannot create '%s': %s", path, strerror(-r));
        goto out_free;
    }
    *ret = w;
    return 0;
out_free:
    free(w->buf);
    free(w->path);
    free(w);
    return r;
}

int moe_st_writer_add(struct moe_st_writer *w, const char *name, enum moe_dtype dtype, int ndim,
                      const int64_t *shape, struct moe_error *err)
{
    struct st_tensor *t;
    uint64_t bytes;

    if (w->begun)
        return moe_error_set(err, -EINVAL, "'%s': tensor '%s' declared after the header", w->path,
                             name);
    if (!name || !*name || (unsigned)dtype >= MOE_DTYPE_COUNT || ndim < 0 || ndim > MOE_MAX_DIMS ||
        (ndim > 0 && !shape))
        return moe_error_set(err, -EINVAL, "'%s': bad declaration of tensor '%s'", w->path,
                             name ? name : "(null)");
    bytes = moe_dtype_size(dtype);
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return moe_error_set(err, -EINVAL, "'%s': tensor '%s': dimension %d is %lld", w->path,
                                 name, i, (long long)shape[i]);
        if (__builtin_mul_overflow(bytes, (uint64_t)shape[i], &bytes))
            return moe_error_set(err, -EOVERFLOW, "'%s': tensor '%s' is too large", w->path, name);
    }
    if (bytes > INT64_MAX - w->data_size)
        return moe_error_set(err, -EOVERFLOW, "'%s': tensor '%s' makes the file too large", w->path,
                             name);
    if (w->n == w->cap) {
        size_t cap = w->cap ? w->cap * 2 : 64;
        struct st_tensor *nt = reallocarray(w->tensors, cap, sizeof(*nt));

        if (!nt)
            return moe_error_set(err, -ENOMEM, "out of memory");
        w->tensors = nt;
        w->cap = cap;
    }
    t = &w->tensors[w->n];
    memset(t, 0, sizeof(*t));
    t->name = strdup(name);
    if (!t->name)
        return moe_error_set(err, -ENOMEM, "out of memory");
    t->dtype = dtype;
    t->ndim = ndim;
    if (ndim > 0)
        memcpy(t->shape, shape, (size_t)ndim * sizeof(shape[0]));
    t->begin = w->data_size;
    t->end = w->data_size + bytes;
    w->data_size = t->end;
    w->n++;
    return 0;
}

uint64_t moe_st_writer_data_size(const struct moe_st_writer *w)
{
    return w->data_size;
}

/* One tensor's entry: {"dtype":..,"shape":[..],"data_offsets":[b,e]}, keys in
 * the reference implementation's order. */
static json_t *tensor_json(const struct st_tensor *t)
{
    json_t *o = json_object(), *shape = json_array(), *offs = json_array();

    if (!o || !shape || !offs)
        goto fail;
    for (int i = 0; i < t->ndim; i++)
        if (json_array_append_new(shape, json_integer(t->shape[i])) < 0)
            goto fail;
    if (json_array_append_new(offs, json_integer((json_int_t)t->begin)) < 0 ||
        json_array_append_new(offs, json_integer((json_int_t)t->end)) < 0)
        goto fail;
    if (json_object_set_new(o, "dtype", json_string(moe_dtype_name(t->dtype))) < 0)
        goto fail;
    if (json_object_set_new(o, "shape", shape) < 0) {
        shape = NULL;
        goto fail;
    }
    shape = NULL;
    if (json_object_set_new(o, "data_offsets", offs) < 0) {
        offs = NULL;
        goto fail;
    }
    return o;
fail:
    json_decref(shape);
    json_decref(offs);
    json_decref(o);
    return NULL;
}

int moe_st_writer_begin(struct moe_st_writer *w, struct moe_error *err)
{
    json_t *root = NULL, *meta = NULL;
    char *text = NULL, *header = NULL;
    unsigned char prefix[8];
    size_t len, padded;
    int r;

    if (w->begun || w->fd < 0)
        return moe_error_set(err, -EINVAL, "'%s': header already written", w->path);
    root = json_object();
    meta = json_object();
    if (!root || !meta || json_object_set_new(meta, "format", json_string("pt")) < 0 ||
        json_object_set(root, "__metadata__", meta) < 0) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < w->n; i++) {
        const struct st_tensor *t = &w->tensors[i];
        json_t *o;

        if (strcmp(t->name, "__metadata__") == 0 || json_object_get(root, t->name)) {
            r = moe_error_set(err, -EINVAL, "'%s': tensor name '%s' used twice", w->path, t->name);
            goto out;
        }
        o = tensor_json(t);
        if (!o) {
            r = moe_error_set(err, -ENOMEM, "out of memory");
            goto out;
        }
        /* json_object_set_new fails (and frees o) for a key that is not UTF-8. */
        if (json_object_set_new(root, t->name, o) < 0) {
            r = moe_error_set(err, -EINVAL, "'%s': tensor name '%s' is not valid UTF-8", w->path,
                              t->name);
            goto out;
        }
    }
    text = json_dumps(root, JSON_COMPACT);
    if (!text) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    len = strlen(text);
    /* Pad with spaces to a multiple of 8 bytes, as the reference does. */
    padded = (len + 7) & ~(size_t)7;
    if (padded > MOE_ST_MAX_HEADER) {
        r = moe_error_set(err, -E2BIG,
                          "'%s': header of %zu bytes (%zu tensors) is over the %u-byte limit "
                          "of readers; use more shards",
                          w->path, padded, w->n, MOE_ST_MAX_HEADER);
        goto out;
    }
    header = malloc(padded);
    if (!header) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    memcpy(header, text, len);
    memset(header + len, ' ', padded - len);
    for (int i = 0; i < 8; i++)
        prefix[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    r = write_all(w->fd, prefix, sizeof(prefix));
    if (r == 0)
        r = write_all(w->fd, header, padded);
    if (r < 0) {
        io_error(w, r, err);
        goto out;
    }
    w->begun = true;
out:
    free(header);
    free(text);
    json_decref(meta);
    json_decref(root);
    return r;
}

static int flush_buf(struct moe_st_writer *w, struct moe_error *err)
{
    int r;

    if (w->buf_len == 0)
        return 0;
    r = write_all(w->fd, w->buf, w->buf_len);
    if (r < 0)
        return io_error(w, r, err);
    w->buf_len = 0;
    return 0;
}

int moe_st_writer_write(struct moe_st_writer *w, const void *data, size_t len,
                        struct moe_error *err)
{
    int r;

    if (!w->begun || w->fd < 0)
        return moe_error_set(err, -EINVAL, "'%s': data written before the header", w->path);
    if (len > w->data_size - w->data_written)
        return moe_error_set(err, -EINVAL,
                             "'%s': %zu bytes written past the end of the declared tensors",
                             w->path, len - (size_t)(w->data_size - w->data_written));
    if (w->buf_len + len <= WRITE_BUF_SIZE) {
        memcpy(w->buf + w->buf_len, data, len);
        w->buf_len += len;
    } else {
        r = flush_buf(w, err);
        if (r < 0)
            return r;
        /* Large chunks skip the copy. */
        if (len >= WRITE_BUF_SIZE / 2) {
            r = write_all(w->fd, data, len);
            if (r < 0)
                return io_error(w, r, err);
        } else {
            memcpy(w->buf, data, len);
            w->buf_len = len;
        }
    }
    w->data_written += len;
    return 0;
}

int moe_st_writer_finish(struct moe_st_writer *w, struct moe_error *err)
{
    int r;

    if (!w->begun || w->fd < 0)
        return moe_error_set(err, -EINVAL, "'%s': finished before the header was written", w->path);
    if (w->data_written != w->data_size) {
        const char *name = "?";

        for (size_t i = 0; i < w->n; i++) {
            if (w->tensors[i].end > w->data_written) {
                name = w->tensors[i].name;
                break;
            }
        }
        return moe_error_set(
            err, -EINVAL, "'%s': tensor '%s' incomplete: %llu of %llu data bytes written", w->path,
            name, (unsigned long long)w->data_written, (unsigned long long)w->data_size);
    }
    r = flush_buf(w, err);
    if (r < 0)
        return r;
    r = close(w->fd);
    w->fd = -1;
    if (r < 0 && errno != EINTR)
        return io_error(w, -errno, err);
    w->finished = true;
    return 0;
}

void moe_st_writer_free(struct moe_st_writer *w)
{
    if (!w)
        return;
    if (w->fd >= 0)
        close(w->fd);
    if (!w->finished)
        unlink(w->path);
    for (size_t i = 0; i < w->n; i++)
        free(w->tensors[i].name);
    free(w->tensors);
    free(w->buf);
    free(w->path);
    free(w);
}
