/*
 * The packed store's index, moe-pack.json (pack.h): parsing and checking
 * it, and finding an expert's blob in it.  The format only: model.c opens
 * stores with it, pack.c (writing, verifying) uses it too, and it uses
 * neither.
 *
 * Invariants of a parsed index (struct moe_pack_index): every tensor and
 * every expert blob lies within [0, data_bytes); no two tensors overlap, no
 * two blobs overlap; each tensor lies wholly inside one blob or outside all
 * of them, aligned; blobs are aligned; (layer, expert) pairs are distinct
 * and sorted; tensor names are distinct and sorted.  Everything in the index
 * is untrusted: numbers are range-checked before any arithmetic, which is
 * done with overflow checks.
 *
 * No state, no locks.
 */
#include "fileio.h"
#include "json.h"
#include "model.h"
#include "pack.h"
#include "quant.h"
#include "safetensors.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define VALUE_TEXT_MAX 64

/* ---- index: parsing -------------------------------------------------------- */

struct pctx {
    const char *fname;
    struct moe_error *err;
};

/* One tensor of "tensors" while parsing: the header entry and its checksum. */
struct ptensor {
    struct moe_st_tensor t;
    uint64_t xxh3;
};

static int cmp_ptensor_name(const void *a, const void *b)
{
    return strcmp(((const struct ptensor *)a)->t.name, ((const struct ptensor *)b)->t.name);
}

static int cmp_ptensor_offset(const void *a, const void *b)
{
    const struct ptensor *x = *(const struct ptensor *const *)a;
    const struct ptensor *y = *(const struct ptensor *const *)b;

    if (x->t.offset != y->t.offset)
        return x->t.offset < y->t.offset ? -1 : 1;
    if (x->t.nbytes != y->t.nbytes)
        return x->t.nbytes < y->t.nbytes ? -1 : 1;
    return strcmp(x->t.name, y->t.name);
}

static int cmp_entry_key(const void *a, const void *b)
{
    const struct moe_pack_entry *x = a, *y = b;

    if (x->layer != y->layer)
        return x->layer < y->layer ? -1 : 1;
    if (x->expert != y->expert)
        return x->expert < y->expert ? -1 : 1;
    return 0;
}

int moe_pack_entry_cmp_offset(const void *a, const void *b)
{
    const struct moe_pack_entry *x = a, *y = b;

    if (x->offset != y->offset)
        return x->offset < y->offset ? -1 : 1;
    return cmp_entry_key(a, b);
}

/*
 * A required integer key of obj in [0, max].  where ("", "tensor 'x': ",
 * "experts[3]: ") and what the value is ("the data size") go in messages.
 */
static int key_uint(const struct pctx *c, json_t *obj, const char *where, const char *key,
                    uint64_t max, uint64_t *ret)
{
    json_t *v = json_object_get(obj, key);
    char vb[VALUE_TEXT_MAX];

    if (!v)
        return moe_error_set(c->err, -EINVAL,
                             "%s: %s'%s' is missing: expected an integer from 0 to %" PRIu64,
                             c->fname, where, key, max);
    if (!json_is_integer(v) || json_integer_value(v) < 0 || (uint64_t)json_integer_value(v) > max)
        return moe_error_set(
            c->err, -EINVAL, "%s: %s'%s' is %s (%s): expected an integer from 0 to %" PRIu64,
            c->fname, where, key, moe_json_text(v, vb, sizeof(vb)), moe_json_kind(v), max);
    *ret = (uint64_t)json_integer_value(v);
    return 0;
}

/* A required string key of obj. */
static int key_str(const struct pctx *c, json_t *obj, const char *where, const char *key,
                   const char *expect, const char **ret)
{
    json_t *v = json_object_get(obj, key);
    char vb[VALUE_TEXT_MAX];

    if (!v)
        return moe_error_set(c->err, -EINVAL, "%s: %s'%s' is missing: expected %s", c->fname, where,
                             key, expect);
    if (!json_is_string(v))
        return moe_error_set(c->err, -EINVAL, "%s: %s'%s' is %s (%s): expected %s", c->fname, where,
                             key, moe_json_text(v, vb, sizeof(vb)), moe_json_kind(v), expect);
    *ret = json_string_value(v);
    return 0;
}

/* "xxh3": exactly 16 lower-case hex digits. */
static int key_hex(const struct pctx *c, json_t *obj, const char *where, uint64_t *ret)
{
    static const char expect[] = "16 lower-case hex digits (XXH3-64)";
    const char *s;
    uint64_t x = 0;
    size_t n;
    int r;

    r = key_str(c, obj, where, "xxh3", expect, &s);
    if (r < 0)
        return r;
    n = strlen(s);
    if (n != 16)
        goto bad;
    for (size_t i = 0; i < n; i++) {
        int d;

        if (s[i] >= '0' && s[i] <= '9')
            d = s[i] - '0';
        else if (s[i] >= 'a' && s[i] <= 'f')
            d = s[i] - 'a' + 10;
        else
            goto bad;
        x = x << 4 | (uint64_t)d;
    }
    *ret = x;
    return 0;
bad:
    return moe_error_set(c->err, -EINVAL, "%s: %s'xxh3' is \"%.40s%s\": expected %s", c->fname,
                         where, s, n > 40 ? "..." : "", expect);
}

/* Parses one entry of "tensors" into p (name set). */
static int parse_tensor(const struct pctx *c, json_t *v, uint64_t data_bytes, struct ptensor *p)
{
    struct moe_st_tensor *t = &p->t;
    char where[320], vb[VALUE_TEXT_MAX], sb[160];
    uint64_t count = 1, nbytes, offset, end;
    const char *dt;
    json_t *shape;
    int r;

    snprintf(where, sizeof(where), "tensors: '%.256s': ", t->name);
    if (!json_is_object(v))
        return moe_error_set(c->err, -EINVAL,
                             "%s: %sis %s (%s): expected an object with dtype, shape, offset, "
                             "nbytes and xxh3",
                             c->fname, where, moe_json_text(v, vb, sizeof(vb)), moe_json_kind(v));
    r = key_str(c, v, where, "dtype", "a safetensors dtype such as \"BF16\"", &dt);
    if (r < 0)
        return r;
    if (moe_dtype_parse(dt, &t->dtype) < 0)
        return moe_error_set(c->err, -EINVAL,
                             "%s: %s'dtype' is \"%.32s\": expected a safetensors dtype such as "
                             "\"BF16\", \"F16\" or \"F32\"",
                             c->fname, where, dt);

    shape = json_object_get(v, "shape");
    if (!shape)
        return moe_error_set(c->err, -EINVAL,
                             "%s: %s'shape' is missing: expected an array of dimensions", c->fname,
                             where);
    if (!json_is_array(shape) || json_array_size(shape) > MOE_MAX_DIMS)
        return moe_error_set(c->err, -EINVAL,
                             "%s: %s'shape' is %s: expected an array of at most %d dimensions",
                             c->fname, where, moe_json_text(shape, vb, sizeof(vb)), MOE_MAX_DIMS);
    t->ndim = (int)json_array_size(shape);
    for (int i = 0; i < t->ndim; i++) {
        json_t *d = json_array_get(shape, (size_t)i);

        if (!json_is_integer(d) || json_integer_value(d) < 0)
            return moe_error_set(c->err, -EINVAL,
                                 "%s: %s'shape' is %s: dimension %d is not a non-negative "
                                 "integer",
                                 c->fname, where, moe_json_text(shape, vb, sizeof(vb)), i);
        t->shape[i] = json_integer_value(d);
        if (__builtin_mul_overflow(count, (uint64_t)t->shape[i], &count))
            return moe_error_set(c->err, -EINVAL, "%s: %s'shape' %s has more than 2^64 elements",
                                 c->fname, where, moe_json_text(shape, vb, sizeof(vb)));
    }
    if (__builtin_mul_overflow(count, (uint64_t)moe_dtype_size(t->dtype), &nbytes) ||
        nbytes > data_bytes)
        return moe_error_set(c->err, -EINVAL,
                             "%s: %sdtype %s x shape %s is more than data_bytes (%" PRIu64 ")",
                             c->fname, where, moe_dtype_name(t->dtype),
                             moe_shape_text(t->shape, t->ndim, sb, sizeof(sb)), data_bytes);

    r = key_uint(c, v, where, "nbytes", data_bytes, &t->nbytes);
    if (r < 0)
        return r;
    if (t->nbytes != nbytes)
        return moe_error_set(c->err, -EINVAL,
                             "%s: %s'nbytes' is %" PRIu64 ": expected dtype %s x shape %s = "
                             "%" PRIu64,
                             c->fname, where, t->nbytes, moe_dtype_name(t->dtype),
                             moe_shape_text(t->shape, t->ndim, sb, sizeof(sb)), nbytes);
    r = key_uint(c, v, where, "offset", data_bytes, &offset);
    if (r < 0)
        return r;
    /* Both are at most data_bytes <= 2^50: no overflow. */
    end = offset + nbytes;
    if (end > data_bytes)
        return moe_error_set(c->err, -EINVAL,
                             "%s: %sbytes [%" PRIu64 ", %" PRIu64 ") run past data_bytes "
                             "(%" PRIu64 ")",
                             c->fname, where, offset, end, data_bytes);
    t->offset = offset;
    return key_hex(c, v, where, &p->xxh3);
}

/* Parses experts[i] into e. */
static int parse_expert(const struct pctx *c, json_t *v, size_t i, uint64_t data_bytes,
                        struct moe_pack_entry *e)
{
    char where[64], vb[VALUE_TEXT_MAX];
    uint64_t layer, expert;
    int r;

    snprintf(where, sizeof(where), "experts[%zu]: ", i);
    if (!json_is_object(v))
        return moe_error_set(c->err, -EINVAL,
                             "%s: %sis %s (%s): expected an object with layer, expert, offset, "
                             "nbytes and xxh3",
                             c->fname, where, moe_json_text(v, vb, sizeof(vb)), moe_json_kind(v));
    r = key_uint(c, v, where, "layer", MOE_MAX_LAYERS - 1, &layer);
    if (r == 0)
        r = key_uint(c, v, where, "expert", MOE_MAX_EXPERTS - 1, &expert);
    if (r < 0)
        return r;
    e->layer = (int)layer;
    e->expert = (int)expert;
    snprintf(where, sizeof(where), "experts[%zu] (layer %d expert %d): ", i, e->layer, e->expert);
    r = key_uint(c, v, where, "offset", data_bytes, &e->offset);
    if (r == 0)
        r = key_uint(c, v, where, "nbytes", data_bytes, &e->nbytes);
    if (r < 0)
        return r;
    if (e->offset % MOE_PACK_ALIGN != 0)
        return moe_error_set(c->err, -EINVAL,
                             "%s: %s'offset' is %" PRIu64 ": expected a multiple of %u", c->fname,
                             where, e->offset, MOE_PACK_ALIGN);
    if (e->nbytes == 0)
        return moe_error_set(c->err, -EINVAL,
                             "%s: %s'nbytes' is 0: expected the bytes of its gate, up and down",
                             c->fname, where);
    if (e->offset + e->nbytes > data_bytes)
        return moe_error_set(c->err, -EINVAL,
                             "%s: %sbytes [%" PRIu64 ", %" PRIu64 ") run past data_bytes "
                             "(%" PRIu64 ")",
                             c->fname, where, e->offset, e->offset + e->nbytes, data_bytes);
    return key_hex(c, v, where, &e->xxh3);
}

static int parse_source(const struct pctx *c, json_t *root)
{
    json_t *src = json_object_get(root, "source"), *files, *f;
    char where[64], vb[VALUE_TEXT_MAX];
    const char *name;
    uint64_t size;
    size_t i;
    int r;

    if (!src || !json_is_object(src))
        return moe_error_set(c->err, -EINVAL,
                             "%s: 'source' is %s: expected an object {\"files\": [{\"name\", "
                             "\"size\"}, ...]}",
                             c->fname, src ? moe_json_text(src, vb, sizeof(vb)) : "missing");
    files = json_object_get(src, "files");
    if (!files || !json_is_array(files))
        return moe_error_set(c->err, -EINVAL,
                             "%s: 'source.files' is %s: expected an array of {\"name\", "
                             "\"size\"}",
                             c->fname, files ? moe_json_text(files, vb, sizeof(vb)) : "missing");
    json_array_foreach(files, i, f)
    {
        snprintf(where, sizeof(where), "source.files[%zu]: ", i);
        if (!json_is_object(f))
            return moe_error_set(c->err, -EINVAL, "%s: %sis %s: expected {\"name\", \"size\"}",
                                 c->fname, where, moe_json_text(f, vb, sizeof(vb)));
        r = key_str(c, f, where, "name", "a file name", &name);
        if (r == 0)
            r = key_uint(c, f, where, "size", INT64_MAX, &size);
        if (r < 0)
            return r;
    }
    return 0;
}

/* The optional "quantization": {"format": "int8"|"int4", "group": N}. */
static int parse_quant(const struct pctx *c, json_t *root, struct moe_quant_fmt *ret)
{
    json_t *q = json_object_get(root, "quantization");
    char vb[VALUE_TEXT_MAX];
    const char *s;
    uint64_t g;
    int r;

    memset(ret, 0, sizeof(*ret));
    if (!q || json_is_null(q))
        return 0;
    if (!json_is_object(q))
        return moe_error_set(c->err, -EINVAL,
                             "%s: 'quantization' is %s: expected {\"format\": \"int8\" or "
                             "\"int4\", \"group\": N}",
                             c->fname, moe_json_text(q, vb, sizeof(vb)));
    r = key_str(c, q, "quantization: ", "format", "\"int8\" or \"int4\"", &s);
    if (r < 0)
        return r;
    if (strcmp(s, "int8") != 0 && strcmp(s, "int4") != 0)
        return moe_error_set(c->err, -EINVAL,
                             "%s: quantization: 'format' is \"%.32s\": expected \"int8\" or "
                             "\"int4\"",
                             c->fname, s);
    ret->q = strcmp(s, "int8") == 0 ? MOE_QUANT_INT8 : MOE_QUANT_INT4;
    r = key_uint(c, q, "quantization: ", "group", MOE_QUANT_GROUP_MAX, &g);
    if (r < 0)
        return r;
    if (g < 32 || g % 32 != 0)
        return moe_error_set(c->err, -EINVAL,
                             "%s: quantization: 'group' is %" PRIu64
                             ": expected a multiple of 32 from 32 to %d",
                             c->fname, g, MOE_QUANT_GROUP_MAX);
    ret->brows = 1;
    ret->bcols = (int)g;
    return 0;
}

/* NULL when s is a plain file name, else what is wrong with it. */
static const char *data_name_problem(const char *s)
{
    if (!*s)
        return "an empty name";
    if (strchr(s, '/'))
        return "a path, not a plain file name in the store's directory";
    if (strcmp(s, ".") == 0 || strcmp(s, "..") == 0)
        return "a directory, not a file name";
    if (strlen(s) > 255)
        return "longer than a file name can be";
    return NULL;
}

/* The checks across entries: overlaps, containment, duplicates. */
static int check_layout(const struct pctx *c, struct ptensor *pt, size_t nt,
                        struct moe_pack_entry *ex, size_t ne)
{
    struct ptensor **by_off;
    size_t j = 0;
    int r = 0;

    /* Blobs: by offset, no overlap. */
    qsort(ex, ne, sizeof(*ex), moe_pack_entry_cmp_offset);
    for (size_t i = 1; i < ne; i++)
        if (ex[i].offset < ex[i - 1].offset + ex[i - 1].nbytes)
            return moe_error_set(c->err, -EINVAL,
                                 "%s: experts: layer %d expert %d [%" PRIu64 ", %" PRIu64
                                 ") and layer %d expert %d [%" PRIu64 ", %" PRIu64 ") overlap",
                                 c->fname, ex[i - 1].layer, ex[i - 1].expert, ex[i - 1].offset,
                                 ex[i - 1].offset + ex[i - 1].nbytes, ex[i].layer, ex[i].expert,
                                 ex[i].offset, ex[i].offset + ex[i].nbytes);

    by_off = malloc(nt * sizeof(*by_off));
    if (!by_off)
        return moe_error_set(c->err, -ENOMEM, "%s: out of memory for %zu tensors", c->fname, nt);
    for (size_t i = 0; i < nt; i++)
        by_off[i] = &pt[i];
    qsort(by_off, nt, sizeof(*by_off), cmp_ptensor_offset);
    for (size_t i = 0; i < nt; i++) {
        const struct moe_st_tensor *t = &by_off[i]->t;
        uint64_t end = t->offset + t->nbytes;

        if (i > 0) {
            const struct moe_st_tensor *p = &by_off[i - 1]->t;

            if (t->offset < p->offset + p->nbytes) {
                r = moe_error_set(c->err, -EINVAL,
                                  "%s: tensors: '%s' [%" PRIu64 ", %" PRIu64 ") and '%s' [%" PRIu64
                                  ", %" PRIu64 ") overlap",
                                  c->fname, p->name, p->offset, p->offset + p->nbytes, t->name,
                                  t->offset, end);
                goto out;
            }
        }
        /* The first blob ending after the tensor's start is the only one
         * that can hold it (blobs are sorted and disjoint). */
        while (j < ne && ex[j].offset + ex[j].nbytes <= t->offset)
            j++;
        if (j < ne && ex[j].offset < end) {
            if (t->offset < ex[j].offset || end > ex[j].offset + ex[j].nbytes) {
                r = moe_error_set(c->err, -EINVAL,
                                  "%s: tensors: '%s' [%" PRIu64 ", %" PRIu64
                                  ") straddles the edge of the blob of layer %d expert %d "
                                  "[%" PRIu64 ", %" PRIu64
                                  "): expected it wholly inside or outside",
                                  c->fname, t->name, t->offset, end, ex[j].layer, ex[j].expert,
                                  ex[j].offset, ex[j].offset + ex[j].nbytes);
                goto out;
            }
        } else if (t->offset % MOE_PACK_ALIGN != 0) {
            r = moe_error_set(c->err, -EINVAL,
                              "%s: tensors: '%s': 'offset' is %" PRIu64
                              ": expected a multiple of %u (a tensor outside any expert blob "
                              "starts aligned)",
                              c->fname, t->name, t->offset, MOE_PACK_ALIGN);
            goto out;
        }
    }

    qsort(ex, ne, sizeof(*ex), cmp_entry_key);
    for (size_t i = 1; i < ne; i++) {
        if (cmp_entry_key(&ex[i - 1], &ex[i]) == 0) {
            r = moe_error_set(c->err, -EINVAL,
                              "%s: experts: layer %d expert %d is listed twice (at offsets "
                              "%" PRIu64 " and %" PRIu64 "): expected one entry per expert",
                              c->fname, ex[i].layer, ex[i].expert,
                              MOE_MIN(ex[i - 1].offset, ex[i].offset),
                              MOE_MAX(ex[i - 1].offset, ex[i].offset));
            goto out;
        }
    }
out:
    free(by_off);
    return r;
}

void moe_pack_index_clear(struct moe_pack_index *ix)
{
    if (!ix)
        return;
    free(ix->data_name);
    moe_st_header_free(ix->tensors);
    free(ix->tensor_xxh3);
    free(ix->experts);
    memset(ix, 0, sizeof(*ix));
}

int moe_pack_index_parse(const char *json, size_t len, const char *fname,
                         struct moe_pack_index *ret, struct moe_error *err)
{
    struct pctx c = {.fname = fname, .err = err};
    struct moe_pack_index ix = {0};
    struct ptensor *pt = NULL;
    size_t nt = 0, ne, i;
    json_t *root, *tens, *exps, *v;
    json_error_t jerr;
    char vb[VALUE_TEXT_MAX];
    const char *s, *key, *why;
    uint64_t x;
    int r;

    root = moe_json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return moe_error_set(err, -EINVAL, "%s: not valid JSON: %s (line %d, column %d)", fname,
                             jerr.text, jerr.line, jerr.column);
    if (!json_is_object(root)) {
        r = moe_error_set(err, -EINVAL,
                          "%s: is %s: expected a JSON object (a moed packed store's "
                          "index)",
                          fname, moe_json_kind(root));
        goto fail;
    }

    r = key_str(&c, root, "", "format", "\"" MOE_PACK_FORMAT "\"", &s);
    if (r < 0)
        goto fail;
    if (strcmp(s, MOE_PACK_FORMAT) != 0) {
        r = moe_error_set(err, -EINVAL,
                          "%s: 'format' is \"%.64s\": expected \"" MOE_PACK_FORMAT "\"", fname, s);
        goto fail;
    }
    r = key_uint(&c, root, "", "version", INT64_MAX, &x);
    if (r < 0)
        goto fail;
    if (x != MOE_PACK_VERSION) {
        r = moe_error_set(err, -EINVAL,
                          "%s: 'version' is %" PRIu64 ": this moed reads version %d; repack "
                          "the model with this moectl",
                          fname, x, MOE_PACK_VERSION);
        goto fail;
    }
    r = key_uint(&c, root, "", "alignment", INT64_MAX, &x);
    if (r < 0)
        goto fail;
    if (x != MOE_PACK_ALIGN) {
        r = moe_error_set(err, -EINVAL, "%s: 'alignment' is %" PRIu64 ": expected %u", fname, x,
                          MOE_PACK_ALIGN);
        goto fail;
    }
    r = key_str(&c, root, "", "data", "the data file's name, \"" MOE_PACK_DATA "\"", &s);
    if (r < 0)
        goto fail;
    why = data_name_problem(s);
    if (why) {
        r = moe_error_set(err, -EINVAL,
                          "%s: 'data' is \"%.64s\": %s (expected \"" MOE_PACK_DATA "\")", fname, s,
                          why);
        goto fail;
    }
    ix.data_name = strdup(s);
    if (!ix.data_name) {
        r = moe_error_set(err, -ENOMEM, "%s: out of memory", fname);
        goto fail;
    }
    r = key_uint(&c, root, "", "data_bytes", MOE_PACK_MAX_DATA, &ix.data_bytes);
    if (r < 0)
        goto fail;
    if (ix.data_bytes % MOE_PACK_ALIGN != 0) {
        r = moe_error_set(err, -EINVAL,
                          "%s: 'data_bytes' is %" PRIu64 ": expected a multiple "
                          "of %u",
                          fname, ix.data_bytes, MOE_PACK_ALIGN);
        goto fail;
    }
    r = parse_source(&c, root);
    if (r < 0)
        goto fail;
    r = parse_quant(&c, root, &ix.quant);
    if (r < 0)
        goto fail;

    tens = json_object_get(root, "tensors");
    if (!tens || !json_is_object(tens) || json_object_size(tens) == 0) {
        r = moe_error_set(err, -EINVAL,
                          "%s: 'tensors' is %s: expected an object of at least one tensor, "
                          "{name: {\"dtype\", \"shape\", \"offset\", \"nbytes\", \"xxh3\"}}",
                          fname, tens ? moe_json_text(tens, vb, sizeof(vb)) : "missing");
        goto fail;
    }
    exps = json_object_get(root, "experts");
    if (!exps || !json_is_array(exps) || json_array_size(exps) == 0) {
        r = moe_error_set(err, -EINVAL,
                          "%s: 'experts' is %s: expected an array of at least one "
                          "{\"layer\", \"expert\", \"offset\", \"nbytes\", \"xxh3\"}",
                          fname, exps ? moe_json_text(exps, vb, sizeof(vb)) : "missing");
        goto fail;
    }

    pt = calloc(json_object_size(tens), sizeof(*pt));
    if (!pt) {
        r = moe_error_set(err, -ENOMEM, "%s: out of memory for %zu tensors", fname,
                          json_object_size(tens));
        goto fail;
    }
    json_object_foreach(tens, key, v)
    {
        pt[nt].t.name = strdup(key);
        if (!pt[nt].t.name) {
            r = moe_error_set(err, -ENOMEM, "%s: out of memory", fname);
            goto fail;
        }
        /* Counted now so that a failure below frees the name. */
        nt++;
        r = parse_tensor(&c, v, ix.data_bytes, &pt[nt - 1]);
        if (r < 0)
            goto fail;
    }

    ne = json_array_size(exps);
    ix.experts = calloc(ne, sizeof(*ix.experts));
    if (!ix.experts) {
        r = moe_error_set(err, -ENOMEM, "%s: out of memory for %zu experts", fname, ne);
        goto fail;
    }
    json_array_foreach(exps, i, v)
    {
        r = parse_expert(&c, v, i, ix.data_bytes, &ix.experts[i]);
        if (r < 0)
            goto fail;
    }
    ix.n_experts = ne;
    r = check_layout(&c, pt, nt, ix.experts, ne);
    if (r < 0)
        goto fail;

    /* Hand the tensors over as a header sorted by name, as model.c looks
     * them up, with their checksums in the same order. */
    qsort(pt, nt, sizeof(*pt), cmp_ptensor_name);
    ix.tensors = calloc(1, sizeof(*ix.tensors));
    ix.tensor_xxh3 = calloc(nt, sizeof(*ix.tensor_xxh3));
    if (ix.tensors)
        ix.tensors->tensors = calloc(nt, sizeof(*ix.tensors->tensors));
    if (!ix.tensors || !ix.tensor_xxh3 || !ix.tensors->tensors) {
        r = moe_error_set(err, -ENOMEM, "%s: out of memory for %zu tensors", fname, nt);
        goto fail;
    }
    ix.tensors->file_size = ix.data_bytes;
    for (i = 0; i < nt; i++) {
        ix.tensors->tensors[i] = pt[i].t;
        ix.tensor_xxh3[i] = pt[i].xxh3;
    }
    ix.tensors->n_tensors = nt;
    free(pt);
    json_decref(root);
    *ret = ix;
    return 0;
fail:
    for (i = 0; i < nt; i++)
        free(pt[i].t.name);
    free(pt);
    moe_pack_index_clear(&ix);
    json_decref(root);
    return r;
}

const struct moe_pack_entry *moe_pack_index_find(const struct moe_pack_index *ix, int layer,
                                                 int expert)
{
    struct moe_pack_entry key = {.layer = layer, .expert = expert};

    if (!ix->experts)
        return NULL;
    return bsearch(&key, ix->experts, ix->n_experts, sizeof(key), cmp_entry_key);
}
