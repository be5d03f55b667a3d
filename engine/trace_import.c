/*
 * Routing import (trace_import.h): csv and jsonl rows into an in-memory
 * trace.  Works on the whole input image line by line; every row is checked
 * before it is appended, and the first bad one fails the import with its
 * line number.  Arrays grow by doubling.
 */
#include "trace_import.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

int moe_trace_import_format_parse(const char *s, enum moe_trace_import_format *ret)
{
    if (s && strcmp(s, "csv") == 0)
        *ret = MOE_TRACE_IMPORT_CSV;
    else if (s && strcmp(s, "jsonl") == 0)
        *ret = MOE_TRACE_IMPORT_JSONL;
    else
        return -EINVAL;
    return 0;
}

/* The trace being built. */
struct builder {
    struct moe_trace *t;
    uint64_t cap;
    const bool *is_moe;
    const char *fname;
};

/* One parsed row. */
struct row {
    int64_t layer, token;
    int n_ids, n_w;
    int64_t ids[MOE_TRACE_MAX_TOPK];
    bool has_w;
};

static int grow(struct builder *b)
{
    const int K = b->t->info.top_k;
    uint64_t cap = b->cap ? 2 * b->cap : 1024;
    uint32_t *tok;
    uint16_t *lay, *exp;

    tok = realloc(b->t->token, cap * sizeof(*tok));
    if (!tok)
        return -ENOMEM;
    b->t->token = tok;
    lay = realloc(b->t->layer, cap * sizeof(*lay));
    if (!lay)
        return -ENOMEM;
    b->t->layer = lay;
    exp = realloc(b->t->expert, cap * K * sizeof(*exp));
    if (!exp)
        return -ENOMEM;
    b->t->expert = exp;
    b->cap = cap;
    return 0;
}

/* Checks row r of line `line` and appends it; 0 or -EINVAL/-ENOMEM. */
static int add_row(struct builder *b, uint64_t line, const struct row *r, struct moe_error *err)
{
    const struct moe_trace_info *in = &b->t->info;
    const int K = in->top_k;

    if (r->layer < 0 || r->layer >= in->n_layers)
        return moe_error_set(err, -EINVAL, "%s:%" PRIu64 ": layer %" PRId64 ": expected 0 to %d",
                             b->fname, line, r->layer, in->n_layers - 1);
    if (b->is_moe && !b->is_moe[r->layer])
        return moe_error_set(err, -EINVAL,
                             "%s:%" PRIu64 ": layer %" PRId64 " is a dense layer of the model: "
                             "it routes no experts",
                             b->fname, line, r->layer);
    if (r->token < 0 || r->token > (int64_t)UINT32_MAX)
        return moe_error_set(err, -EINVAL,
                             "%s:%" PRIu64 ": token %" PRId64 ": expected 0 to %" PRIu32, b->fname,
                             line, r->token, UINT32_MAX);
    if (r->n_ids != K)
        return moe_error_set(err, -EINVAL, "%s:%" PRIu64 ": %d experts: expected top_k = %d",
                             b->fname, line, r->n_ids, K);
    if (r->has_w && r->n_w != K)
        return moe_error_set(err, -EINVAL, "%s:%" PRIu64 ": %d weights: expected top_k = %d",
                             b->fname, line, r->n_w, K);
    for (int j = 0; j < K; j++) {
        if (r->ids[j] < 0 || r->ids[j] >= in->n_experts)
            return moe_error_set(err, -EINVAL,
                                 "%s:%" PRIu64 ": expert %" PRId64 " (slot %d): expected 0 to %d",
                                 b->fname, line, r->ids[j], j, in->n_experts - 1);
        for (int i = 0; i < j; i++)
            if (r->ids[i] == r->ids[j])
                return moe_error_set(err, -EINVAL,
                                     "%s:%" PRIu64 ": expert %" PRId64 " twice (slots %d and %d)",
                                     b->fname, line, r->ids[j], i, j);
    }
    if (b->t->n_records == b->cap && grow(b) < 0)
        return moe_error_set(err, -ENOMEM, "%s:%" PRIu64 ": out of memory", b->fname, line);
    b->t->token[b->t->n_records] = (uint32_t)r->token;
    b->t->layer[b->t->n_records] = (uint16_t)r->layer;
    for (int j = 0; j < K; j++)
        b->t->expert[b->t->n_records * K + j] = (uint16_t)r->ids[j];
    b->t->n_records++;
    return 0;
}

/* ---- csv ------------------------------------------------------------------------------- */

/* A whole decimal integer in [s, e) (spaces around allowed); false when not. */
static bool parse_i64(const char *s, const char *e, int64_t *ret)
{
    int64_t v = 0;
    bool neg = false, any = false;

    while (s < e && (*s == ' ' || *s == '\t'))
        s++;
    while (e > s && (e[-1] == ' ' || e[-1] == '\t'))
        e--;
    if (s < e && (*s == '-' || *s == '+'))
        neg = *s++ == '-';
    for (; s < e; s++) {
        if (*s < '0' || *s > '9')
            return false;
        if (v > (INT64_MAX - 9) / 10)
            return false;
        v = v * 10 + (*s - '0');
        any = true;
    }
    *ret = neg ? -v : v;
    return any;
}

/* A finite real in [s, e); false when not. */
static bool parse_real(const char *s, const char *e, double *ret)
{
    char buf[64], *end;
    size_t n;

    while (s < e && (*s == ' ' || *s == '\t'))
        s++;
    while (e > s && (e[-1] == ' ' || e[-1] == '\t'))
        e--;
    n = (size_t)(e - s);
    if (n == 0 || n >= sizeof(buf))
        return false;
    memcpy(buf, s, n);
    buf[n] = 0;
    *ret = strtod(buf, &end);
    return *end == 0 && isfinite(*ret);
}

/* Splits the list field [s, e) ("3 7", "3;7", "[3, 7]") into values: ids
 * (reals == NULL) or reals.  *n: how many; false on a bad value or more
 * than MOE_TRACE_MAX_TOPK. */
static bool parse_list(const char *s, const char *e, int64_t *ids, double *reals, int *n)
{
    while (s < e && (*s == ' ' || *s == '"'))
        s++;
    while (e > s && (e[-1] == ' ' || e[-1] == '"' || e[-1] == '\r'))
        e--;
    if (s < e && *s == '[') {
        if (e[-1] != ']')
            return false;
        s++, e--;
    }
    *n = 0;
    while (s < e) {
        const char *v = s;

        while (s < e && *s != ' ' && *s != ';' && *s != '|' && *s != ',')
            s++;
        if (s > v) {
            if (*n == MOE_TRACE_MAX_TOPK)
                return false;
            if (reals ? !parse_real(v, s, &reals[*n]) : !parse_i64(v, s, &ids[*n]))
                return false;
            (*n)++;
        }
        if (s < e)
            s++;
    }
    return true;
}

/* Splits a csv line into at most max fields, commas inside double quotes
 * or brackets kept; *n fields; false on an unclosed quote. */
static bool split_csv(const char *s, const char *e, const char **fs, const char **fe, int max,
                      int *n)
{
    bool quoted = false;
    int depth = 0;

    *n = 0;
    fs[0] = s;
    for (const char *p = s;; p++) {
        if (p == e || (*p == ',' && !quoted && depth == 0)) {
            if (*n == max)
                return false;
            fe[(*n)++] = p;
            if (p == e)
                break;
            if (*n < max)
                fs[*n] = p + 1;
            continue;
        }
        if (*p == '"')
            quoted = !quoted;
        else if (*p == '[' && !quoted)
            depth++;
        else if (*p == ']' && !quoted && depth > 0)
            depth--;
    }
    return !quoted;
}

static int csv_line(struct builder *b, uint64_t line, const char *s, const char *e, bool first,
                    struct moe_error *err)
{
    const char *fs[4], *fe[4];
    double w[MOE_TRACE_MAX_TOPK];
    struct row r = {0};
    int n;

    if (e > s && e[-1] == '\r')
        e--;
    if (!split_csv(s, e, fs, fe, 4, &n) || n < 3)
        return moe_error_set(err, -EINVAL,
                             "%s:%" PRIu64 ": expected layer,token,experts[,weights] (%s)",
                             b->fname, line,
                             n < 3 ? "too few fields"
                                   : "too many fields or an "
                                     "unclosed quote");
    if (!parse_i64(fs[0], fe[0], &r.layer)) {
        if (first)
            return 1; /* a header */
        return moe_error_set(err, -EINVAL, "%s:%" PRIu64 ": layer '%.*s': expected an integer",
                             b->fname, line, (int)MOE_MIN(fe[0] - fs[0], 40), fs[0]);
    }
    if (!parse_i64(fs[1], fe[1], &r.token))
        return moe_error_set(err, -EINVAL, "%s:%" PRIu64 ": token '%.*s': expected an integer",
                             b->fname, line, (int)MOE_MIN(fe[1] - fs[1], 40), fs[1]);
    if (!parse_list(fs[2], fe[2], r.ids, NULL, &r.n_ids))
        return moe_error_set(err, -EINVAL,
                             "%s:%" PRIu64 ": experts '%.*s': expected at most %d integers "
                             "separated by spaces, ';' or '|'",
                             b->fname, line, (int)MOE_MIN(fe[2] - fs[2], 60), fs[2],
                             MOE_TRACE_MAX_TOPK);
    if (n == 4) {
        r.has_w = true;
        if (!parse_list(fs[3], fe[3], NULL, w, &r.n_w))
            return moe_error_set(err, -EINVAL,
                                 "%s:%" PRIu64 ": weights '%.*s': expected at most %d finite "
                                 "numbers",
                                 b->fname, line, (int)MOE_MIN(fe[3] - fs[3], 60), fs[3],
                                 MOE_TRACE_MAX_TOPK);
    }
    return add_row(b, line, &r, err);
}

/* ---- jsonl ----------------------------------------------------------------------------- */

static bool json_int_in(json_t *v, int64_t *ret)
{
    if (json_is_integer(v)) {
        *ret = (int64_t)json_integer_value(v);
        return true;
    }
    return false;
}

static int jsonl_line(struct builder *b, uint64_t line, const char *s, const char *e,
                      struct moe_error *err)
{
    json_error_t je;
    json_t *o = json_loadb(s, (size_t)(e - s), JSON_REJECT_DUPLICATES, &je), *a, *v;
    struct row r = {0};
    size_t i;
    int ret;

    if (!o)
        return moe_error_set(err, -EINVAL, "%s:%" PRIu64 ":%d: not JSON: %s", b->fname, line,
                             je.column, je.text);
    if (!json_is_object(o)) {
        ret = moe_error_set(err, -EINVAL, "%s:%" PRIu64 ": expected a JSON object per line",
                            b->fname, line);
        goto out;
    }
    if (!json_int_in(json_object_get(o, "layer"), &r.layer) ||
        !json_int_in(json_object_get(o, "token"), &r.token)) {
        ret = moe_error_set(err, -EINVAL,
                            "%s:%" PRIu64 ": expected integer \"layer\" and \"token\" members",
                            b->fname, line);
        goto out;
    }
    a = json_object_get(o, "experts");
    if (!json_is_array(a) || json_array_size(a) > MOE_TRACE_MAX_TOPK) {
        ret = moe_error_set(err, -EINVAL,
                            "%s:%" PRIu64 ": \"experts\": expected an array of at most %d "
                            "integers",
                            b->fname, line, MOE_TRACE_MAX_TOPK);
        goto out;
    }
    json_array_foreach(a, i, v)
    {
        if (!json_int_in(v, &r.ids[i])) {
            ret =
                moe_error_set(err, -EINVAL, "%s:%" PRIu64 ": \"experts\"[%zu]: expected an integer",
                              b->fname, line, i);
            goto out;
        }
    }
    r.n_ids = (int)json_array_size(a);
    a = json_object_get(o, "weights");
    if (a && !json_is_null(a)) {
        r.has_w = true;
        if (!json_is_array(a)) {
            ret = moe_error_set(err, -EINVAL, "%s:%" PRIu64 ": \"weights\": expected an array",
                                b->fname, line);
            goto out;
        }
        json_array_foreach(a, i, v)
        {
            if (!json_is_number(v) || !isfinite(json_number_value(v))) {
                ret = moe_error_set(err, -EINVAL,
                                    "%s:%" PRIu64 ": \"weights\"[%zu]: expected a finite number",
                                    b->fname, line, i);
                goto out;
            }
        }
        r.n_w = (int)MOE_MIN(json_array_size(a), (size_t)INT32_MAX);
    }
    ret = add_row(b, line, &r, err);
out:
    json_decref(o);
    return ret;
}

int moe_trace_import(const void *buf, size_t len, enum moe_trace_import_format fmt,
                     const struct moe_trace_info *info, const bool *is_moe, const char *fname,
                     struct moe_trace **ret, struct moe_error *err)
{
    const char *p = buf, *end = p + len;
    struct builder b = {.is_moe = is_moe, .fname = fname ? fname : "input"};
    bool first = true;
    uint64_t line = 0;
    int r = 0;

    if (info->n_layers < 1 || info->n_layers > MOE_TRACE_MAX_LAYERS || info->n_experts < 1 ||
        info->n_experts > MOE_TRACE_MAX_EXPERTS || info->top_k < 1 ||
        info->top_k > MOE_MIN(MOE_TRACE_MAX_TOPK, info->n_experts))
        return moe_error_set(err, -EINVAL,
                             "%s: model shape %d layers x %d experts, top-%d: out of the trace "
                             "format's limits",
                             b.fname, info->n_layers, info->n_experts, info->top_k);
    if ((unsigned)fmt > MOE_TRACE_IMPORT_JSONL)
        return moe_error_set(err, -EINVAL, "unknown import format %d", (int)fmt);
    b.t = calloc(1, sizeof(*b.t));
    if (!b.t)
        return moe_error_set(err, -ENOMEM, "out of memory");
    b.t->info = *info;
    b.t->info.lookahead = false;
    b.t->info.model[sizeof(b.t->info.model) - 1] = 0;
    if (grow(&b) < 0) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p)), *le = nl ? nl : end;
        const char *s = p;

        line++;
        p = nl ? nl + 1 : end;
        if ((size_t)(le - s) > MOE_TRACE_IMPORT_MAX_LINE) {
            r = moe_error_set(err, -EINVAL, "%s:%" PRIu64 ": line longer than %d bytes", b.fname,
                              line, MOE_TRACE_IMPORT_MAX_LINE);
            goto fail;
        }
        if (memchr(s, 0, (size_t)(le - s))) {
            r = moe_error_set(err, -EINVAL, "%s:%" PRIu64 ": a NUL byte: not a text file", b.fname,
                              line);
            goto fail;
        }
        while (s < le && (*s == ' ' || *s == '\t' || *s == '\r'))
            s++;
        if (s == le || (fmt == MOE_TRACE_IMPORT_CSV && *s == '#'))
            continue;
        if (fmt == MOE_TRACE_IMPORT_CSV)
            r = csv_line(&b, line, s, le, first, err);
        else
            r = jsonl_line(&b, line, s, le, err);
        first = false;
        if (r < 0)
            goto fail;
    }
    *ret = b.t;
    return 0;
fail:
    moe_trace_free(b.t);
    return r;
}
