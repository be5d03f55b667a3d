/*
 * Safetensors headers, the sharded-checkpoint index and small whole-file
 * reads: owns the parsing and checking of both JSON formats.
 *
 * Everything read here is untrusted.  The header length is checked against
 * the file size before anything is allocated; every tensor's dtype, shape and
 * data_offsets are checked, its byte count is computed with overflow checks
 * and compared with its range; the ranges are then sorted and must tile the
 * data exactly (no overlap, no gap, nothing after the last one), as the
 * reference implementation requires.  Shard names in an index come from
 * outside and must be plain file names.  Every message starts with the file
 * name and says which tensor or key is wrong and what was expected.
 *
 * No state, no locks: parsed objects are owned by the caller.
 */
#include "fileio.h"
#include "json.h"
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define ST_SUFFIX ".safetensors"
#define VALUE_TEXT_MAX 64

/* ---- small helpers -------------------------------------------------------- */

/* A non-negative JSON integer, or false. */
static bool json_uint(const json_t *v, uint64_t *ret)
{
    json_int_t x;

    if (!json_is_integer(v))
        return false;
    x = json_integer_value(v);
    if (x < 0)
        return false;
    *ret = (uint64_t)x;
    return true;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* ---- safetensors header --------------------------------------------------- */

static int cmp_tensor_name(const void *a, const void *b)
{
    return strcmp(((const struct moe_st_tensor *)a)->name, ((const struct moe_st_tensor *)b)->name);
}

/* Order of byte ranges: by first byte, then by last (empty ranges first). */
static int cmp_tensor_range(const void *a, const void *b)
{
    const struct moe_st_tensor *x = *(const struct moe_st_tensor *const *)a;
    const struct moe_st_tensor *y = *(const struct moe_st_tensor *const *)b;

    if (x->offset != y->offset)
        return x->offset < y->offset ? -1 : 1;
    if (x->nbytes != y->nbytes)
        return x->nbytes < y->nbytes ? -1 : 1;
    return strcmp(x->name, y->name);
}

void moe_st_header_free(struct moe_st_header *h)
{
    if (!h)
        return;
    for (size_t i = 0; i < h->n_tensors; i++)
        free(h->tensors[i].name);
    free(h->tensors);
    free(h);
}

/* Checks the length prefix n against the limit and the file size. */
static int check_header_len(uint64_t n, uint64_t file_size, const char *fname,
                            struct moe_error *err)
{
    if (n > MOE_ST_MAX_HEADER)
        return moe_error_set(err, -EINVAL,
                             "%s: header length %" PRIu64 " is over the limit of %u bytes: "
                             "not a safetensors file, or a damaged one",
                             fname, n, MOE_ST_MAX_HEADER);
    if (file_size < 8 || n > file_size - 8)
        return moe_error_set(err, -EINVAL,
                             "%s: header length %" PRIu64 " runs past the end of the file "
                             "(size %" PRIu64 "): file truncated, or not a safetensors file",
                             fname, n, file_size);
    return 0;
}

/* Parses the dtype, shape and data_offsets of one tensor into t (name set). */
static int parse_tensor(const char *fname, json_t *v, uint64_t data_start, uint64_t file_size,
                        struct moe_st_tensor *t, struct moe_error *err)
{
    const char *name = t->name;
    json_t *dt, *shape, *offs;
    char vb[VALUE_TEXT_MAX], sb[256];
    uint64_t begin, end, count = 1, nbytes;
    size_t i;

    if (!json_is_object(v))
        return moe_error_set(err, -EINVAL,
                             "%s: tensor '%s' is %s (%s), expected an object "
                             "with dtype, shape and data_offsets",
                             fname, name, moe_json_kind(v), moe_json_text(v, vb, sizeof(vb)));

    dt = json_object_get(v, "dtype");
    if (!dt)
        return moe_error_set(err, -EINVAL, "%s: tensor '%s': no dtype", fname, name);
    if (!json_is_string(dt))
        return moe_error_set(err, -EINVAL,
                             "%s: tensor '%s': dtype is %s (%s), expected a string "
                             "such as \"BF16\"",
                             fname, name, moe_json_kind(dt), moe_json_text(dt, vb, sizeof(vb)));
    if (moe_dtype_parse(json_string_value(dt), &t->dtype) < 0) {
        char list[256];
        size_t at = 0;

        for (int k = 0; k < MOE_DTYPE_COUNT && at < sizeof(list); k++)
            at += (size_t)snprintf(list + at, sizeof(list) - at, "%s%s", k ? ", " : "",
                                   moe_dtype_name((enum moe_dtype)k));
        return moe_error_set(err, -EINVAL,
                             "%s: tensor '%s': unknown dtype %s, expected one of "
                             "%s",
                             fname, name, moe_json_text(dt, vb, sizeof(vb)), list);
    }

    shape = json_object_get(v, "shape");
    if (!shape)
        return moe_error_set(err, -EINVAL, "%s: tensor '%s': no shape", fname, name);
    if (!json_is_array(shape))
        return moe_error_set(err, -EINVAL,
                             "%s: tensor '%s': shape is %s (%s), expected an "
                             "array of dimensions",
                             fname, name, moe_json_kind(shape),
                             moe_json_text(shape, vb, sizeof(vb)));
    if (json_array_size(shape) > MOE_MAX_DIMS)
        return moe_error_set(err, -EINVAL,
                             "%s: tensor '%s': shape has %zu dimensions, at most "
                             "%d are supported",
                             fname, name, json_array_size(shape), MOE_MAX_DIMS);
    t->ndim = (int)json_array_size(shape);
    for (i = 0; i < json_array_size(shape); i++) {
        json_t *d = json_array_get(shape, i);
        uint64_t x;

        if (!json_uint(d, &x))
            return moe_error_set(err, -EINVAL,
                                 "%s: tensor '%s': shape %s: dimension %zu is "
                                 "%s, expected a non-negative integer",
                                 fname, name, moe_json_text(shape, vb, sizeof(vb)), i,
                                 moe_json_text(d, sb, sizeof(sb)));
        t->shape[i] = (int64_t)x;
        if (__builtin_mul_overflow(count, x, &count))
            return moe_error_set(err, -EINVAL,
                                 "%s: tensor '%s': shape %s has more than 2^64 "
                                 "elements",
                                 fname, name, moe_json_text(shape, vb, sizeof(vb)));
    }
    if (__builtin_mul_overflow(count, (uint64_t)moe_dtype_size(t->dtype), &nbytes))
        return moe_error_set(err, -EINVAL,
                             "%s: tensor '%s': dtype %s x shape %s is more than "
                             "2^64 bytes",
                             fname, name, moe_dtype_name(t->dtype),
                             moe_shape_text(t->shape, t->ndim, sb, sizeof(sb)));

    offs = json_object_get(v, "data_offsets");
    if (!offs)
        return moe_error_set(err, -EINVAL, "%s: tensor '%s': no data_offsets", fname, name);
    if (!json_is_array(offs) || json_array_size(offs) != 2 ||
        !json_uint(json_array_get(offs, 0), &begin) || !json_uint(json_array_get(offs, 1), &end))
        return moe_error_set(err, -EINVAL,
                             "%s: tensor '%s': data_offsets is %s, expected "
                             "[begin, end], two non-negative integers",
                             fname, name, moe_json_text(offs, vb, sizeof(vb)));
    if (begin > end)
        return moe_error_set(err, -EINVAL,
                             "%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64
                             "): begin is after end",
                             fname, name, begin, end);
    if (end - begin != nbytes)
        return moe_error_set(err, -EINVAL,
                             "%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64
                             ") hold %" PRIu64 " bytes but dtype %s x shape %s "
                             "needs %" PRIu64,
                             fname, name, begin, end, end - begin, moe_dtype_name(t->dtype),
                             moe_shape_text(t->shape, t->ndim, sb, sizeof(sb)), nbytes);
    /* data_start <= file_size was checked with the header length. */
    if (end > file_size - data_start)
        return moe_error_set(err, -EINVAL,
                             "%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64
                             "): byte range [%" PRIu64 ", %" PRIu64 ") runs past "
                             "the end of the file (size %" PRIu64 "): file truncated?",
                             fname, name, begin, end, data_start + begin, data_start + end,
                             file_size);
    t->offset = data_start + begin;
    t->nbytes = nbytes;
    return 0;
}

/* Checks the ranges of h's tensors tile [data_start, file_size) exactly. */
static int check_coverage(const struct moe_st_header *h, const char *fname, struct moe_error *err)
{
    const struct moe_st_tensor **by_range;
    const struct moe_st_tensor *prev = NULL;
    uint64_t pos = h->data_start, ds = h->data_start;
    int r = 0;

    if (h->n_tensors == 0) {
        if (h->file_size != ds)
            return moe_error_set(err, -EINVAL,
                                 "%s: trailing bytes: no tensors, but %" PRIu64
                                 " bytes of data follow the header",
                                 fname, h->file_size - ds);
        return 0;
    }
    by_range = malloc(h->n_tensors * sizeof(*by_range));
    if (!by_range)
        return moe_error_set(err, -ENOMEM, "%s: out of memory for %zu tensors", fname,
                             h->n_tensors);
    for (size_t i = 0; i < h->n_tensors; i++)
        by_range[i] = &h->tensors[i];
    qsort(by_range, h->n_tensors, sizeof(*by_range), cmp_tensor_range);

    /* Each range must start where the previous one ended, so at step i
     * every earlier range ends at or before pos and prev ends at pos. */
    for (size_t i = 0; i < h->n_tensors; i++) {
        const struct moe_st_tensor *t = by_range[i];

        if (t->offset < pos) {
            r = moe_error_set(err, -EINVAL,
                              "%s: tensor '%s' data_offsets [%" PRIu64 ", %" PRIu64
                              ") and tensor '%s' data_offsets [%" PRIu64 ", %" PRIu64 ") overlap",
                              fname, prev->name, prev->offset - ds,
                              prev->offset - ds + prev->nbytes, t->name, t->offset - ds,
                              t->offset - ds + t->nbytes);
            goto out;
        }
        if (t->offset > pos) {
            if (prev)
                r = moe_error_set(err, -EINVAL,
                                  "%s: gap: data bytes [%" PRIu64 ", %" PRIu64
                                  ") between tensor '%s' and tensor '%s' belong to no tensor",
                                  fname, pos - ds, t->offset - ds, prev->name, t->name);
            else
                r = moe_error_set(err, -EINVAL,
                                  "%s: gap: data bytes [0, %" PRIu64
                                  ") before tensor '%s' belong to no tensor",
                                  fname, t->offset - ds, t->name);
            goto out;
        }
        pos = t->offset + t->nbytes;
        prev = t;
    }
    if (pos != h->file_size)
        r = moe_error_set(err, -EINVAL,
                          "%s: trailing bytes: data bytes [%" PRIu64 ", %" PRIu64
                          ") after the last tensor '%s' belong to no tensor (file size %" PRIu64
                          ")",
                          fname, pos - ds, h->file_size - ds, prev->name, h->file_size);
out:
    free(by_range);
    return r;
}

int moe_st_header_parse(const char *json, size_t json_len, uint64_t file_size, const char *fname,
                        struct moe_st_header **ret, struct moe_error *err)
{
    struct moe_st_header *h = NULL;
    json_t *root = NULL, *v;
    json_error_t jerr;
    const char *key;
    size_t n = 0;
    int r;

    r = check_header_len(json_len, file_size, fname, err);
    if (r < 0)
        return r;
    root = moe_json_loadb(json, json_len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return moe_error_set(err, -EINVAL,
                             "%s: header is not valid JSON: %s (line %d, column "
                             "%d)",
                             fname, jerr.text, jerr.line, jerr.column);
    if (!json_is_object(root)) {
        r = moe_error_set(err, -EINVAL, "%s: header is %s, expected a JSON object", fname,
                          moe_json_kind(root));
        goto fail;
    }

    h = calloc(1, sizeof(*h));
    if (!h) {
        r = moe_error_set(err, -ENOMEM, "%s: out of memory", fname);
        goto fail;
    }
    h->header_len = json_len;
    h->data_start = 8 + (uint64_t)json_len;
    h->file_size = file_size;
    h->tensors = calloc(json_object_size(root) ? json_object_size(root) : 1, sizeof(*h->tensors));
    if (!h->tensors) {
        r = moe_error_set(err, -ENOMEM, "%s: out of memory for %zu tensors", fname,
                          json_object_size(root));
        goto fail;
    }

    json_object_foreach(root, key, v)
    {
        struct moe_st_tensor *t;

        if (strcmp(key, "__metadata__") == 0) {
            const char *mk;
            json_t *mv;
            char vb[VALUE_TEXT_MAX];

            if (!json_is_object(v)) {
                r = moe_error_set(err, -EINVAL,
                                  "%s: __metadata__ is %s, expected an object of "
                                  "strings",
                                  fname, moe_json_kind(v));
                goto fail;
            }
            json_object_foreach(v, mk, mv)
            {
                if (!json_is_string(mv)) {
                    r = moe_error_set(err, -EINVAL,
                                      "%s: __metadata__ '%s' is %s (%s), expected "
                                      "a string",
                                      fname, mk, moe_json_kind(mv),
                                      moe_json_text(mv, vb, sizeof(vb)));
                    goto fail;
                }
            }
            continue;
        }
        t = &h->tensors[n];
        t->name = strdup(key);
        if (!t->name) {
            r = moe_error_set(err, -ENOMEM, "%s: out of memory", fname);
            goto fail;
        }
        /* Counted now so that a failure below frees the name. */
        h->n_tensors = ++n;
        r = parse_tensor(fname, v, h->data_start, file_size, t, err);
        if (r < 0)
            goto fail;
    }

    qsort(h->tensors, h->n_tensors, sizeof(*h->tensors), cmp_tensor_name);
    r = check_coverage(h, fname, err);
    if (r < 0)
        goto fail;
    json_decref(root);
    *ret = h;
    return 0;
fail:
    moe_st_header_free(h);
    json_decref(root);
    return r;
}

int moe_st_header_read_fd(int fd, const char *fname, struct moe_st_header **ret,
                          struct moe_error *err)
{
    unsigned char pre[8];
    struct stat st;
    uint64_t n = 0, size;
    char *buf;
    ssize_t got;
    int r;

    if (fstat(fd, &st) < 0)
        return moe_error_set(err, -errno, "%s: cannot stat: %s", fname, strerror(errno));
    if (!S_ISREG(st.st_mode))
        return moe_error_set(err, -EINVAL, "%s: not a regular file", fname);
    size = (uint64_t)st.st_size;
    if (size < 8)
        return moe_error_set(err, -EINVAL,
                             "%s: file is %" PRIu64 " bytes, too short for the "
                             "8-byte header length of a safetensors file",
                             fname, size);
    got = moe_pread_full(fd, pre, sizeof(pre), 0);
    if (got < 0)
        return moe_error_set(err, (int)got, "%s: cannot read the header length: %s", fname,
                             strerror((int)-got));
    if (got != (ssize_t)sizeof(pre))
        return moe_error_set(err, -EIO,
                             "%s: short read of the header length: file truncated "
                             "while being read?",
                             fname);
    for (int i = 7; i >= 0; i--)
        n = n << 8 | pre[i];
    r = check_header_len(n, size, fname, err);
    if (r < 0)
        return r;

    buf = malloc(n ? (size_t)n : 1);
    if (!buf)
        return moe_error_set(err, -ENOMEM, "%s: out of memory for a header of %" PRIu64 " bytes",
                             fname, n);
    got = moe_pread_full(fd, buf, (size_t)n, 8);
    if (got < 0) {
        r = moe_error_set(err, (int)got, "%s: cannot read the header: %s", fname,
                          strerror((int)-got));
        goto out;
    }
    if ((uint64_t)got != n) {
        r = moe_error_set(err, -EIO,
                          "%s: short read of the header: file truncated while being "
                          "read?",
                          fname);
        goto out;
    }
    r = moe_st_header_parse(buf, (size_t)n, size, fname, ret, err);
out:
    free(buf);
    return r;
}

int moe_st_header_read(const char *path, const char *fname, struct moe_st_header **ret,
                       struct moe_error *err)
{
    int fd, r;

    if (!fname)
        fname = path;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return moe_error_set(err, -errno, "%s: cannot open: %s", fname, strerror(errno));
    r = moe_st_header_read_fd(fd, fname, ret, err);
    close(fd);
    return r;
}

const struct moe_st_tensor *moe_st_header_find(const struct moe_st_header *h, const char *name)
{
    size_t lo = 0, hi = h->n_tensors;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(name, h->tensors[mid].name);

        if (c == 0)
            return &h->tensors[mid];
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

/* ---- index ---------------------------------------------------------------- */

/* NULL when s is a plain shard file name, else what is wrong with it. */
static const char *shard_name_problem(const char *s)
{
    size_t n = strlen(s), sl = strlen(ST_SUFFIX);

    if (n == 0)
        return "an empty name";
    if (strchr(s, '/'))
        return "a path, not a plain file name in the checkpoint directory";
    if (strcmp(s, ".") == 0 || strcmp(s, "..") == 0)
        return "a directory, not a file name";
    if (n <= sl || strcmp(s + n - sl, ST_SUFFIX) != 0)
        return "not a file name ending in " ST_SUFFIX;
    return NULL;
}

static int cmp_entry(const void *a, const void *b)
{
    return strcmp(((const struct moe_st_index_entry *)a)->tensor,
                  ((const struct moe_st_index_entry *)b)->tensor);
}

void moe_st_index_free(struct moe_st_index *idx)
{
    if (!idx)
        return;
    for (size_t i = 0; i < idx->n_entries; i++)
        free(idx->entries[i].tensor);
    free(idx->entries);
    for (size_t i = 0; i < idx->n_files; i++)
        free(idx->files[i]);
    free(idx->files);
    free(idx);
}

int moe_st_index_parse(const char *json, size_t json_len, const char *fname,
                       struct moe_st_index **ret, struct moe_error *err)
{
    struct moe_st_index *idx = NULL;
    const char **names = NULL;
    json_t *root, *wm, *meta, *v;
    json_error_t jerr;
    char vb[VALUE_TEXT_MAX];
    const char *key;
    size_t n, i, nf;
    int r;

    root = moe_json_loadb(json, json_len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return moe_error_set(err, -EINVAL, "%s: not valid JSON: %s (line %d, column %d)", fname,
                             jerr.text, jerr.line, jerr.column);
    if (!json_is_object(root)) {
        r = moe_error_set(err, -EINVAL, "%s: is %s, expected a JSON object with weight_map", fname,
                          moe_json_kind(root));
        goto fail;
    }
    idx = calloc(1, sizeof(*idx));
    if (!idx) {
        r = moe_error_set(err, -ENOMEM, "%s: out of memory", fname);
        goto fail;
    }

    meta = json_object_get(root, "metadata");
    if (meta && !json_is_null(meta)) {
        json_t *ts;

        if (!json_is_object(meta)) {
            r = moe_error_set(err, -EINVAL, "%s: metadata is %s (%s), expected an object", fname,
                              moe_json_kind(meta), moe_json_text(meta, vb, sizeof(vb)));
            goto fail;
        }
        ts = json_object_get(meta, "total_size");
        if (ts && !json_is_null(ts) && !json_uint(ts, &idx->total_size)) {
            r = moe_error_set(err, -EINVAL,
                              "%s: metadata.total_size is %s, expected a "
                              "non-negative integer",
                              fname, moe_json_text(ts, vb, sizeof(vb)));
            goto fail;
        }
    }

    wm = json_object_get(root, "weight_map");
    if (!wm) {
        r = moe_error_set(err, -EINVAL,
                          "%s: no weight_map: expected {\"weight_map\": {tensor: "
                          "file, ...}}",
                          fname);
        goto fail;
    }
    if (!json_is_object(wm)) {
        r = moe_error_set(err, -EINVAL,
                          "%s: weight_map is %s, expected an object mapping "
                          "tensor names to shard files",
                          fname, moe_json_kind(wm));
        goto fail;
    }
    n = json_object_size(wm);
    if (n == 0) {
        r = moe_error_set(err, -EINVAL, "%s: weight_map is empty", fname);
        goto fail;
    }
    idx->entries = calloc(n, sizeof(*idx->entries));
    names = calloc(n, sizeof(*names));
    if (!idx->entries || !names) {
        r = moe_error_set(err, -ENOMEM, "%s: out of memory for %zu tensors", fname, n);
        goto fail;
    }
    i = 0;
    json_object_foreach(wm, key, v)
    {
        const char *why;

        if (!json_is_string(v)) {
            r = moe_error_set(err, -EINVAL,
                              "%s: weight_map: tensor '%s' is mapped to %s (%s), "
                              "expected a shard file name",
                              fname, key, moe_json_kind(v), moe_json_text(v, vb, sizeof(vb)));
            goto fail;
        }
        why = shard_name_problem(json_string_value(v));
        if (why) {
            r = moe_error_set(err, -EINVAL,
                              "%s: weight_map: tensor '%s' is mapped to '%s', %s "
                              "(expected a file such as model-00001-of-00002" ST_SUFFIX ")",
                              fname, key, json_string_value(v), why);
            goto fail;
        }
        names[i++] = json_string_value(v);
    }

    /* Distinct shard names, sorted. */
    qsort(names, n, sizeof(*names), cmp_str);
    nf = 0;
    for (i = 0; i < n; i++)
        if (nf == 0 || strcmp(names[nf - 1], names[i]) != 0)
            names[nf++] = names[i];
    idx->files = calloc(nf, sizeof(*idx->files));
    if (!idx->files) {
        r = moe_error_set(err, -ENOMEM, "%s: out of memory", fname);
        goto fail;
    }
    for (i = 0; i < nf; i++) {
        idx->files[i] = strdup(names[i]);
        if (!idx->files[i]) {
            r = moe_error_set(err, -ENOMEM, "%s: out of memory", fname);
            goto fail;
        }
        idx->n_files = i + 1;
    }

    json_object_foreach(wm, key, v)
    {
        const char *f = json_string_value(v);
        const char **at = bsearch(&f, names, nf, sizeof(*names), cmp_str);
        struct moe_st_index_entry *e = &idx->entries[idx->n_entries];

        e->tensor = strdup(key);
        if (!e->tensor) {
            r = moe_error_set(err, -ENOMEM, "%s: out of memory", fname);
            goto fail;
        }
        idx->n_entries++;
        e->file = (int)(at - names);
    }
    qsort(idx->entries, idx->n_entries, sizeof(*idx->entries), cmp_entry);

    free(names);
    json_decref(root);
    *ret = idx;
    return 0;
fail:
    free(names);
    moe_st_index_free(idx);
    json_decref(root);
    return r;
}

int moe_st_index_read(const char *path, const char *fname, struct moe_st_index **ret,
                      struct moe_error *err)
{
    char *buf;
    size_t len;
    int r;

    if (!fname)
        fname = path;
    /* DeepSeek-V3's index is about 9 MB; leave room. */
    r = moe_read_file(path, 64u << 20, &buf, &len, err);
    if (r < 0)
        return r;
    r = moe_st_index_parse(buf, len, fname, ret, err);
    free(buf);
    return r;
}

int moe_st_index_find(const struct moe_st_index *idx, const char *tensor)
{
    size_t lo = 0, hi = idx->n_entries;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(tensor, idx->entries[mid].tensor);

        if (c == 0)
            return idx->entries[mid].file;
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return -1;
}

/* ---- whole small files ---------------------------------------------------- */

int moe_read_file(const char *path, size_t max_bytes, char **ret, size_t *ret_len,
                  struct moe_error *err)
{
    struct stat st;
    size_t cap, len = 0;
    char *buf = NULL;
    int fd, r;

    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return moe_error_set(err, -errno, "%s: cannot open: %s", path, strerror(errno));
    if (fstat(fd, &st) < 0) {
        r = moe_error_set(err, -errno, "%s: cannot stat: %s", path, strerror(errno));
        goto fail;
    }
    if (S_ISDIR(st.st_mode)) {
        r = moe_error_set(err, -EISDIR, "%s: is a directory, expected a file", path);
        goto fail;
    }
    if (S_ISREG(st.st_mode) && (uint64_t)st.st_size > max_bytes) {
        r = moe_error_set(err, -EFBIG, "%s: file is %" PRIu64 " bytes, over the limit of %zu", path,
                          (uint64_t)st.st_size, max_bytes);
        goto fail;
    }
    /* The size is a hint only (the file may change, or be a pipe): read
     * until end of file, one byte past the limit at most. */
    cap = S_ISREG(st.st_mode) ? (size_t)st.st_size + 1 : 4096;
    if (cap > max_bytes + 1)
        cap = max_bytes + 1;
    for (;;) {
        ssize_t n;

        if (!buf || len == cap) {
            size_t ncap = buf ? MOE_MIN(cap * 2, max_bytes + 1) : cap;
            char *nb;

            if (buf && len > max_bytes) {
                r = moe_error_set(err, -EFBIG, "%s: file is over the limit of %zu bytes", path,
                                  max_bytes);
                goto fail;
            }
            nb = realloc(buf, ncap + 1);
            if (!nb) {
                r = moe_error_set(err, -ENOMEM, "%s: out of memory reading %zu bytes", path, ncap);
                goto fail;
            }
            buf = nb;
            cap = ncap;
        }
        n = read(fd, buf + len, cap - len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            r = moe_error_set(err, -errno, "%s: read failed: %s", path, strerror(errno));
            goto fail;
        }
        if (n == 0)
            break;
        len += (size_t)n;
    }
    if (len > max_bytes) {
        r = moe_error_set(err, -EFBIG, "%s: file is over the limit of %zu bytes", path, max_bytes);
        goto fail;
    }
    close(fd);
    buf[len] = 0;
    *ret = buf;
    *ret_len = len;
    return 0;
fail:
    free(buf);
    close(fd);
    return r;
}
