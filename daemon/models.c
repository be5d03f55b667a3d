/*
 * The daemon's model table (moed.h): models added at start or by LoadModel,
 * looked up by name or shared-memory id with a reference taken, and
 * unloaded once no request holds them.  d->lock guards the table and the
 * references.
 */
#include "moed.h"

#include "log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The model called name, with a reference taken (lock not held), or NULL. */
struct moed_model *moed_model_get(struct moed *d, const char *name)
{
    struct moed_model *mm = NULL;

    pthread_mutex_lock(&d->lock);
    for (int i = 0; i < d->n_models; i++)
        if (strcmp(d->models[i]->name, name) == 0) {
            mm = d->models[i];
            mm->refs++;
            break;
        }
    pthread_mutex_unlock(&d->lock);
    return mm;
}

void moed_model_put(struct moed *d, struct moed_model *mm)
{
    pthread_mutex_lock(&d->lock);
    mm->refs--;
    pthread_mutex_unlock(&d->lock);
}

struct moed_model *moed_model_get_id(struct moed *d, uint32_t id)
{
    struct moed_model *mm = NULL;

    pthread_mutex_lock(&d->lock);
    for (int i = 0; i < d->n_models; i++)
        if (d->models[i]->id == id) {
            mm = d->models[i];
            mm->refs++;
            break;
        }
    pthread_mutex_unlock(&d->lock);
    return mm;
}

int moed_load_model(struct moed *d, const char *name, const char *dir, struct moe_error *err)
{
    struct moe_model *m;
    char *real;
    bool trusted;
    int r = moed_model_dir_check(d, dir, &real, &trusted, err);

    if (r < 0)
        return r;
    r = moe_model_open(real, &m, err);
    free(real);
    if (r < 0)
        return r;
    /* A model loaded at run time computes at [compute] compute_precision. */
    m->precision = (enum moe_compute_precision)d->cfg.compute_precision;
    if (!trusted) {
        r = moed_model_files_check(d, m, err);
        if (r < 0) {
            moe_model_free(m);
            return r;
        }
    }
    return moed_add_model(d, name, m, err);
}

int moed_add_model(struct moed *d, const char *name, struct moe_model *m, struct moe_error *err)
{
    struct moed_model *mm = calloc(1, sizeof(*mm));
    int r;

    if (!mm) {
        moe_model_free(m);
        return moe_error_set(err, -ENOMEM, "out of memory");
    }
    mm->name = strdup(name);
    mm->m = m;
    r = moe_cache_add_model(d->cache, mm->m, name, &mm->cache_id, err);
    if (r < 0)
        goto fail;
    r = moe_engine_attach(mm->m, d->backend, d->cache, mm->cache_id, &mm->e);
    if (r < 0) {
        moe_error_set(err, r, "out of memory");
        moe_cache_remove_model(d->cache, mm->cache_id, NULL);
        goto fail;
    }
    pthread_mutex_lock(&d->lock);
    for (int i = 0; i < d->n_models; i++)
        if (strcmp(d->models[i]->name, name) == 0)
            r = moe_error_set(err, -EEXIST, "a model called '%s' is loaded already", name);
    if (r == 0 && d->n_models == MOED_MAX_MODELS)
        r = moe_error_set(err, -E2BIG, "%d models are loaded: unload one first", MOED_MAX_MODELS);
    if (r == 0) {
        mm->id = ++d->next_model_id;
        d->models[d->n_models++] = mm;
    }
    pthread_mutex_unlock(&d->lock);
    if (r < 0) {
        moe_engine_free(mm->e);
        moe_cache_remove_model(d->cache, mm->cache_id, NULL);
        goto fail;
    }
    moe_log(MOE_LOG_INFO, "loaded %s from %s: %s, %d MoE layers x %d experts, top-%d%s", name,
            m->dir, moe_arch_name(mm->m->cfg.arch), mm->m->n_moe_layers, mm->m->cfg.n_experts,
            mm->m->cfg.top_k, mm->m->packed ? ", packed store" : "");
    if (d->model_came)
        d->model_came(d, mm);
    return 0;
fail:
    moe_model_free(mm->m);
    free(mm->name);
    free(mm);
    return r;
}

static void model_free(struct moed *d, struct moed_model *mm)
{
    if (d->model_gone)
        d->model_gone(d, mm);
    moe_engine_free(mm->e);
    moe_cache_remove_model(d->cache, mm->cache_id, NULL);
    moe_model_free(mm->m);
    free(mm->name);
    free(mm);
}

int moed_unload_model(struct moed *d, const char *name, struct moe_error *err)
{
    struct moed_model *mm = NULL;
    int r = 0;

    pthread_mutex_lock(&d->lock);
    for (int i = 0; i < d->n_models; i++) {
        if (strcmp(d->models[i]->name, name) != 0)
            continue;
        mm = d->models[i];
        if (mm->refs) {
            r = moe_error_set(err, -EBUSY, "model '%s' has %d requests in flight: drain first",
                              name, mm->refs);
            mm = NULL;
            break;
        }
        d->models[i] = d->models[--d->n_models];
        break;
    }
    pthread_mutex_unlock(&d->lock);
    if (r < 0)
        return r;
    if (!mm)
        return moe_error_set(err, -ENOENT, "no model called '%s'", name);
    model_free(d, mm);
    moe_log(MOE_LOG_INFO, "unloaded %s", name);
    return 0;
}

void moed_free_models(struct moed *d)
{
    moed_loader_stop(d); /* no load adds a model after this */
    for (int i = 0; i < d->n_models; i++)
        model_free(d, d->models[i]);
    d->n_models = 0;
}
