/*
 * Rewriting a checkpoint in tests of bad input: its tensors read into
 * memory (struct rfile), changed, dropped or added, and written back as
 * one model.safetensors; config.json edited; a refusal checked.  Static
 * functions for the tests that include it (test-fp8.c, test-mxfp4.c).
 */
#ifndef MOE_TESTS_ST_REWRITE_H
#define MOE_TESTS_ST_REWRITE_H

#include <errno.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "common.h"
#include "model.h"
#include "safetensors.h"
#include "st_writer.h"
#include "tests.h"

struct rt {
    char name[256];
    enum moe_dtype dtype;
    int ndim;
    int64_t shape[MOE_MAX_DIMS];
    uint8_t *data;
    uint64_t nbytes;
    bool dropped;
};

struct rfile {
    size_t n;
    struct rt *t;
};

static inline void rfile_read(const char *dir, struct rfile *f)
{
    char *path;
    struct moe_st_header *h;
    struct moe_error err = {0};
    FILE *fp;

    ASSERT_TRUE(asprintf(&path, "%s/model.safetensors", dir) > 0);
    if (moe_st_header_read(path, NULL, &h, &err) < 0)
        FAIL("%s", err.msg);
    fp = fopen(path, "rb");
    ASSERT_TRUE(fp != NULL);
    f->n = h->n_tensors;
    f->t = calloc(f->n + 8, sizeof(*f->t)); /* room for tensors added */
    ASSERT_TRUE(f->t != NULL);
    for (size_t i = 0; i < f->n; i++) {
        const struct moe_st_tensor *s = &h->tensors[i];
        struct rt *t = &f->t[i];

        snprintf(t->name, sizeof(t->name), "%s", s->name);
        t->dtype = s->dtype;
        t->ndim = s->ndim;
        memcpy(t->shape, s->shape, sizeof(t->shape));
        t->nbytes = s->nbytes;
        t->data = malloc(s->nbytes + 1);
        ASSERT_TRUE(t->data != NULL);
        ASSERT_EQ(fseeko(fp, (off_t)s->offset, SEEK_SET), 0);
        ASSERT_EQ(fread(t->data, 1, s->nbytes, fp), s->nbytes);
    }
    fclose(fp);
    moe_st_header_free(h);
    free(path);
}

static inline struct rt *rfind(struct rfile *f, const char *name)
{
    for (size_t i = 0; i < f->n; i++)
        if (!strcmp(f->t[i].name, name))
            return &f->t[i];
    FAIL("no tensor %s", name);
}

/* Appends a copy of src (from another file). */
static inline void radd(struct rfile *f, const struct rt *src)
{
    struct rt *t = &f->t[f->n++];

    *t = *src;
    t->data = malloc(src->nbytes + 1);
    ASSERT_TRUE(t->data != NULL);
    memcpy(t->data, src->data, src->nbytes);
}

static inline void rfile_write(const char *dir, struct rfile *f)
{
    char *path;
    struct moe_st_writer *w;
    struct moe_error err = {0};

    ASSERT_TRUE(asprintf(&path, "%s/model.safetensors", dir) > 0);
    ASSERT_EQ(moe_st_writer_init(path, &w, &err), 0);
    for (size_t i = 0; i < f->n; i++)
        if (!f->t[i].dropped)
            ASSERT_EQ(moe_st_writer_add(w, f->t[i].name, f->t[i].dtype, f->t[i].ndim, f->t[i].shape,
                                        &err),
                      0);
    ASSERT_EQ(moe_st_writer_begin(w, &err), 0);
    for (size_t i = 0; i < f->n; i++)
        if (!f->t[i].dropped)
            ASSERT_EQ(moe_st_writer_write(w, f->t[i].data, f->t[i].nbytes, &err), 0);
    if (moe_st_writer_finish(w, &err) < 0)
        FAIL("%s", err.msg);
    moe_st_writer_free(w);
    free(path);
}

static inline void rfile_free(struct rfile *f)
{
    for (size_t i = 0; i < f->n; i++)
        free(f->t[i].data);
    free(f->t);
}

/* Sets key in dir's config.json (v NULL: removes it). */
static inline void set_cfg(const char *dir, const char *key, json_t *v)
{
    char *path;
    json_t *c;

    ASSERT_TRUE(asprintf(&path, "%s/config.json", dir) > 0);
    c = json_load_file(path, 0, NULL);
    ASSERT_TRUE(c != NULL);
    if (v)
        json_object_set_new(c, key, v);
    else
        json_object_del(c, key);
    ASSERT_EQ(json_dump_file(c, path, 0), 0);
    json_decref(c);
    free(path);
}

/* Sets quantization_config.key in dir's config.json (v NULL: removes
 * quantization_config). */
static inline void set_quant(const char *dir, const char *key, json_t *v)
{
    char *path;
    json_t *c, *q;

    ASSERT_TRUE(asprintf(&path, "%s/config.json", dir) > 0);
    c = json_load_file(path, 0, NULL);
    ASSERT_TRUE(c != NULL);
    q = json_object_get(c, "quantization_config");
    if (!key)
        json_object_del(c, "quantization_config");
    else if (v)
        json_object_set_new(q, key, v);
    else
        json_object_del(q, key);
    ASSERT_EQ(json_dump_file(c, path, 0), 0);
    json_decref(c);
    free(path);
}

/* Opening dir fails with -EINVAL and a message containing needle. */
static inline void expect_open_fails(const char *dir, const char *what, const char *needle)
{
    struct moe_model *m = NULL;
    struct moe_error err = {0};
    int r = moe_model_open(dir, &m, &err);

    if (r != -EINVAL)
        FAIL("%s: expected -EINVAL, got %d (%s)", what, r, err.msg);
    if (!strstr(err.msg, needle))
        FAIL("%s: \"%s\" does not contain \"%s\"", what, err.msg, needle);
    printf("refused (%s): %s\n", what, err.msg);
}

#endif
