/*
 * The expert cache (cache.h).
 *
 * Owns: the tiers (tier.h), one policy per tier (policy.h), the pager
 * (pager.h), and per registered model a table of entries, one per (layer,
 * expert), each with its slot in every tier, its pins, its bad mark, its
 * pager job and its counters; plus the model's routing statistics (layer
 * pass clocks, the next-layer co-occurrence table and the current forecast).
 *
 * Lock: c->lock guards everything but the counters (relaxed atomics, read
 * without the lock by snapshots).  Page-in completions run on pager threads:
 * they check the checksum without the lock, then take it to publish the
 * result and wake waiters on c->cv.  The lock is never held across I/O.
 *
 * Page-in path: an expert missing from tier 0 is taken from the nearest
 * lower tier holding it (upload), or read from its model file into the last
 * tier (always host memory) and uploaded from there.  Room is made in each
 * tier it enters before the read starts, so a completion never has to evict.
 *
 * Batches: moe_cache_acquire holds every expert of its batch (centry.holds)
 * before it makes room for any, so that paging in one expert of a batch never
 * evicts another of the same batch, in any tier; resident ones are pinned
 * first, then the missing ones are loaded in the batch's order.  When they
 * cannot all fit, the batch keeps the longest prefix that does and defers
 * the rest (-ENOSPC) to a later acquire.
 */
#include "cache.h"

#include "log.h"
#include "model.h"
#include "policy.h"
#include "quant.h"
#include "tier.h"

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <xxhash.h>

enum slot_state { SLOT_ABSENT = 0, SLOT_LOADING, SLOT_RESIDENT };

struct counters {
    _Atomic uint64_t hits, misses, prefetch_hits, prefetches, wasted_prefetches, evictions,
        page_ins, page_in_errors, bytes_paged, prefetched_bytes, wasted_bytes, warm_loads,
        warm_hits;
};

struct tier_slot {
    void *data;
    uint8_t state;
    struct moe_pnode node;
    struct moe_pnode ghost[MOE_SHADOWS]; /* the adaptive policy's shadows (policy.h) */
};

struct cmodel;

struct centry {
    struct cmodel *mod;
    int layer, expert;
    uint64_t bytes;   /* slot size in every tier */
    uint64_t toff[6]; /* gate, up, down (and their scales) within the slot */
    int n_segs;
    struct moe_pager_seg segs[6]; /* layout: dst is an offset in the slot */
    struct moe_pager_seg io[6];   /* the page-in in flight: dst an address */
    uint32_t refs;                /* batch pins */
    uint32_t holds;               /* batches inside moe_cache_acquire that need it:
                                   * no tier evicts it meanwhile */
    bool op_pinned;
    bool loading;    /* a read or upload is in flight */
    bool prefetched; /* brought in by a prefetch, not used yet */
    float pf_prob;   /* the forecast it was prefetched on */
    bool bad;
    int bad_code;
    char *bad_msg;
    bool bad_ident;    /* it failed while one of its files was modified */
    uint32_t retry_ms; /* its back-off: 0 never failed, doubled per failure */
    uint64_t retry_at; /* moe_now_ns() after which its next use retries it */
    uint64_t load_t0;
    int load_tier; /* the tier the read goes to */
    struct moe_pager_job job;
    struct moe_cache *cache;
    struct tier_slot *t; /* [n_tiers] */
    struct counters ctr;
    /* A Hugging Face checkpoint's expert (no checksum in an index): the
     * XXH3-64 of its tensors, taken at its first page-in once two reads
     * agree on it, against which later page-ins are checked.  Written and
     * read only by page_in_done(), one page-in of an entry at a time
     * (loading, under c->lock, orders them). */
    bool summed;
    uint64_t sum;
    bool warm;       /* paged in by a warm start, not used yet */
    float heat_prev; /* the heat a warm start gave it (moe_cache_heat carries half) */
    /* The page-in in flight is its second read (reread()), and the hash of
     * its first.  Same discipline as sum. */
    bool rereading;
    uint64_t first_sum;
};

struct cmodel {
    int id;
    bool registered; /* in c->models and c->group_model */
    char name[64];
    const struct moe_model *m; /* NULL for a shape */
    int n_layers, n_experts, top_k;
    int n_moe;
    int *moe_idx;   /* [n_layers]: index among MoE layers, -1 dense */
    int *moe_layer; /* [n_moe]: layer of each MoE index */
    uint64_t expert_bytes;
    int base_group;
    int *pager_file;        /* [m->n_files] */
    int n_pager_files;      /* of them, added to the pager (closed by model_free) */
    struct centry *entries; /* [n_layers * n_experts] */
    double *passes;         /* [n_layers] */
    int cur_idx;            /* MoE index of the layer acquired last, -1 none */
    /* predictor */
    float *cooc; /* [n_moe - 1][E][E]: expert at MoE layer i, then at i + 1 */
    float *rows; /* [n_moe - 1][E] */
    int32_t *prev_ids;
    int prev_n, prev_idx, prev_cap;
    int32_t *prev_next; /* the lookahead given with prev_ids, for MoE layer prev_idx + 1 */
    int prev_next_cap;
    bool prev_has_next;
    double la_hits, la_total; /* lookahead experts later used, of those named */
    double *pred;             /* [E] forecast for MoE layer pred_idx */
    double *pred_scratch;     /* [2E] for predict(): no allocation under the lock */
    uint8_t *prefetch_mask;   /* [n_layers * E]: 0 where prefetch leaves it; NULL: none */
    double *pf_used;          /* [n_layers] prefetches used, decayed (the throttle) */
    double *pf_expect;        /* [n_layers] their forecasts and the wasted ones', summed */
    uint64_t last_observe;    /* moe_now_ns() of its last observed step; 0 none */
    double step_s;            /* seconds between its steps, decayed mean; 0 unknown */
    double miss_steps;        /* share of its steps with a miss, decayed mean (the throttle) */
    int pred_idx;
    _Atomic int bad_experts;
};

struct tier_state {
    struct moe_tier *t;
    uint64_t used;
    uint64_t resident;
    struct moe_policy policy;
    struct counters ctr;
    _Atomic uint64_t hist[MOE_HIST_BUCKETS];
    _Atomic uint64_t lat_count, lat_sum, lat_max;
};

struct moe_cache {
    struct moe_cache_config cfg;
    pthread_mutex_t lock;
    pthread_cond_t cv;
    int n_tiers;
    struct tier_state tiers[MOE_CACHE_MAX_TIERS];
    struct moe_pager *pager;
    struct moe_policy_env env;
    int n_models;
    struct cmodel **models;
    int n_groups;
    struct cmodel **group_model; /* [n_groups] */
    uint64_t prefetch_used;      /* bytes prefetched and not used yet */
    int loading;                 /* entries with page-ins in flight */
    uint64_t reading;            /* their bytes: the disk's backlog (the throttle) */
    uint64_t read_done;          /* moe_now_ns() when the last page-in finished */
    double read_s_per_byte;      /* the disk's measured time per byte, decayed mean; 0
                                  * unknown */
    uint64_t releases;           /* moe_cache_release calls, for waiters */
    struct counters total;
};

static inline void inc(_Atomic uint64_t *a, uint64_t v)
{
    atomic_fetch_add_explicit(a, v, memory_order_relaxed);
}

/* ---- policy environment ------------------------------------------------------------------- */

static double env_distance(void *ctx, int group)
{
    struct moe_cache *c = ctx;
    struct cmodel *mod = c->group_model[group];
    int idx = mod->moe_idx[group - mod->base_group], d;

    if (mod->cur_idx < 0 || idx < 0)
        return mod->n_moe;
    d = (idx - mod->cur_idx + mod->n_moe) % mod->n_moe;
    return d == 0 ? mod->n_moe : d;
}

static double env_cycle(void *ctx, int group)
{
    struct moe_cache *c = ctx;

    return MOE_MAX(1, c->group_model[group]->n_moe);
}

static double env_passes(void *ctx, int group)
{
    struct moe_cache *c = ctx;
    struct cmodel *mod = c->group_model[group];

    return mod->passes[group - mod->base_group];
}

static double env_predicted(void *ctx, int group, int expert)
{
    struct moe_cache *c = ctx;
    struct cmodel *mod = c->group_model[group];
    int idx = mod->moe_idx[group - mod->base_group];

    if (!mod->pred || idx < 0 || idx != mod->pred_idx)
        return -1.0;
    return mod->pred[expert];
}

/* ---- creation ------------------------------------------------------------------------------ */

int moe_cache_create(const struct moe_cache_config *cfg, struct moe_cache **ret,
                     struct moe_error *err)
{
    struct moe_cache *c;
    struct moe_tier *host;
    int r;

    if ((unsigned)cfg->policy >= MOE_POLICY_COUNT)
        return moe_error_set(err, -EINVAL, "unknown cache policy %d", (int)cfg->policy);
    if (isnan(cfg->prefetch_precision) || cfg->prefetch_precision > 1)
        return moe_error_set(err, -EINVAL, "prefetch precision %g: expected at most 1",
                             cfg->prefetch_precision);
    if (cfg->half_life < 0 || isnan(cfg->half_life))
        return moe_error_set(err, -EINVAL, "cache half-life %g: expected a positive number",
                             cfg->half_life);
    c = calloc(1, sizeof(*c));
    if (!c)
        return moe_error_set(err, -ENOMEM, "out of memory");
    c->cfg = *cfg;
    if (c->cfg.half_life == 0)
        c->cfg.half_life = 8;
    if (c->cfg.prefetch_bytes == 0)
        c->cfg.prefetch_bytes = cfg->host_bytes / 4;
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->cv, NULL);
    c->env = (struct moe_policy_env){
        .ctx = c,
        .distance = env_distance,
        .cycle = env_cycle,
        .passes = env_passes,
        .predicted = env_predicted,
        .half_life = c->cfg.half_life,
    };
    r = moe_tier_host_create("host", cfg->host_bytes, cfg->simulate, &host, err);
    if (r < 0)
        goto fail;
    c->tiers[0].t = host;
    c->n_tiers = 1;
    r = moe_policy_init(&c->tiers[0].policy, cfg->policy, &c->env);
    if (r < 0) {
        moe_error_set(err, r, "out of memory");
        goto fail;
    }
    if (!cfg->simulate) {
        struct moe_pager_config pc = cfg->pager;
        struct iovec iov[64];
        int n_iov = 0;

        if (cfg->register_buffers) {
            /* The kernel takes fixed buffers of at most 1 GiB each. */
            for (uint64_t off = 0; off < host->span && n_iov < 64; off += 1ull << 30) {
                iov[n_iov].iov_base = (uint8_t *)host->base + off;
                iov[n_iov].iov_len = (size_t)MOE_MIN(1ull << 30, host->span - off);
                n_iov++;
            }
            pc.regions = iov;
            pc.n_regions = n_iov;
        }
        r = moe_pager_create(&pc, &c->pager, err);
        if (r < 0)
            goto fail;
    }
    *ret = c;
    return 0;
fail:
    moe_cache_free(c);
    return r;
}

static void model_free(struct moe_cache *c, struct cmodel *mod)
{
    if (!mod)
        return;
    /* The pager holds the files open (and registered with its rings) until
     * they are removed: a model loaded and unloaded N times would keep N
     * descriptors, and a deleted checkpoint's blocks, otherwise. */
    for (int i = 0; i < mod->n_pager_files; i++)
        moe_pager_remove_file(c->pager, mod->pager_file[i]);
    if (mod->entries) {
        for (int i = 0; i < mod->n_layers * mod->n_experts; i++) {
            struct centry *e = &mod->entries[i];

            if (!e->t)
                continue;
            for (int k = 0; k < c->n_tiers; k++) {
                struct tier_state *ts = &c->tiers[k];

                if (e->t[k].state != SLOT_ABSENT) {
                    ts->t->ops->free(ts->t, e->t[k].data, e->bytes);
                    ts->used -= e->bytes;
                    ts->resident--;
                }
                if (e->t[k].node.resident)
                    ts->policy.ops->remove(&ts->policy, &e->t[k].node);
                moe_policy_forget(&ts->policy, &e->t[k].node);
            }
            if (e->prefetched)
                c->prefetch_used -= e->bytes;
            free(e->t);
            free(e->bad_msg);
        }
    }
    if (mod->registered)
        for (int g = 0; g < mod->n_layers; g++)
            c->group_model[mod->base_group + g] = NULL;
    free(mod->entries);
    free(mod->moe_idx);
    free(mod->moe_layer);
    free(mod->pager_file);
    free(mod->passes);
    free(mod->cooc);
    free(mod->rows);
    free(mod->prev_ids);
    free(mod->prev_next);
    free(mod->pred);
    free(mod->pred_scratch);
    free(mod->pf_used);
    free(mod->pf_expect);
    free(mod->prefetch_mask);
    free(mod);
}

void moe_cache_free(struct moe_cache *c)
{
    if (!c)
        return;
    /* The pager finishes its jobs first: their completions take c->lock.
     * It closes every file, so model_free has none left to remove. */
    moe_pager_free(c->pager);
    c->pager = NULL;
    for (int i = 0; i < c->n_models; i++)
        model_free(c, c->models[i]);
    for (int k = 0; k < c->n_tiers; k++) {
        moe_policy_clear(&c->tiers[k].policy);
        moe_tier_destroy(c->tiers[k].t);
    }
    free(c->models);
    free(c->group_model);
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->lock);
    free(c);
}

struct moe_pager *moe_cache_pager(struct moe_cache *c)
{
    return c->pager;
}

int moe_cache_push_tier(struct moe_cache *c, struct moe_tier *t, struct moe_error *err)
{
    int r;

    pthread_mutex_lock(&c->lock);
    if (c->n_models > 0) {
        pthread_mutex_unlock(&c->lock);
        return moe_error_set(err, -EBUSY, "tier %s: tiers must be added before any model", t->name);
    }
    if (c->n_tiers == MOE_CACHE_MAX_TIERS) {
        pthread_mutex_unlock(&c->lock);
        return moe_error_set(err, -E2BIG, "tier %s: at most %d tiers", t->name,
                             MOE_CACHE_MAX_TIERS);
    }
    memmove(&c->tiers[1], &c->tiers[0], (size_t)c->n_tiers * sizeof(c->tiers[0]));
    memset(&c->tiers[0], 0, sizeof(c->tiers[0]));
    c->tiers[0].t = t;
    r = moe_policy_init(&c->tiers[0].policy, c->cfg.policy, &c->env);
    if (r < 0) {
        memmove(&c->tiers[0], &c->tiers[1], (size_t)c->n_tiers * sizeof(c->tiers[0]));
        pthread_mutex_unlock(&c->lock);
        return moe_error_set(err, r, "out of memory");
    }
    /* The policies of the other tiers moved: their lists point at
     * themselves. */
    for (int k = 1; k <= c->n_tiers; k++) {
        struct moe_policy *p = &c->tiers[k].policy;

        if (p->lru.next == &c->tiers[k - 1].policy.lru || p->lru.next == NULL) {
            p->lru.next = p->lru.prev = &p->lru;
        } else {
            p->lru.next->prev = &p->lru;
            p->lru.prev->next = &p->lru;
        }
    }
    c->n_tiers++;
    pthread_mutex_unlock(&c->lock);
    return 0;
}

/* ---- models -------------------------------------------------------------------------------- */

static uint64_t align_up(uint64_t v)
{
    return (v + MOE_PAGER_ALIGN - 1) & ~(uint64_t)(MOE_PAGER_ALIGN - 1);
}

/*
 * Lays out an expert's slot: the aligned spans of its tensors (gate, up,
 * down, and a quantized expert's three scale tensors), merged where they
 * touch in one file, back to back; each tensor's offset inside.
 */
static void entry_layout(struct centry *e, const struct moe_expert_ref *x, const int *pager_file)
{
    const struct moe_tensor_ref *t[6];
    int n = moe_expert_tensors(x, t);
    int order[6] = {0, 1, 2, 3, 4, 5};
    uint64_t slot = 0;

    /* sort by (file, offset) */
    for (int i = 0; i < n; i++)
        for (int j = i + 1; j < n; j++)
            if (t[order[j]]->file < t[order[i]]->file ||
                (t[order[j]]->file == t[order[i]]->file &&
                 t[order[j]]->offset < t[order[i]]->offset)) {
                int s = order[i];

                order[i] = order[j];
                order[j] = s;
            }
    e->n_segs = 0;
    for (int i = 0; i < n; i++) {
        const struct moe_tensor_ref *r = t[order[i]];
        uint64_t start, span;
        struct moe_pager_seg *s = e->n_segs ? &e->segs[e->n_segs - 1] : NULL;

        moe_pager_span(r->offset, r->nbytes, &start, &span);
        if (s && s->file == pager_file[r->file] && start <= s->offset + s->len) {
            uint64_t end = MOE_MAX(s->offset + s->len, start + span);

            slot += end - (s->offset + s->len);
            s->len = end - s->offset;
            s->need = MOE_MAX(s->need, r->offset + r->nbytes - s->offset);
        } else {
            s = &e->segs[e->n_segs++];
            s->file = pager_file[r->file];
            s->offset = start;
            s->len = span;
            s->need = r->offset + r->nbytes - start;
            s->dst = (void *)(uintptr_t)slot; /* offset in the slot */
            slot += span;
        }
        e->toff[order[i]] = (uint64_t)(uintptr_t)s->dst + (r->offset - s->offset);
    }
    e->bytes = slot;
}

static int model_common(struct moe_cache *c, struct cmodel *mod, struct moe_error *err)
{
    size_t n = (size_t)mod->n_layers * (size_t)mod->n_experts;
    struct cmodel **ms, **gm;
    int k;

    mod->entries = calloc(n, sizeof(*mod->entries));
    mod->passes = calloc((size_t)mod->n_layers, sizeof(*mod->passes));
    mod->moe_layer = calloc((size_t)MOE_MAX(1, mod->n_moe), sizeof(int));
    mod->pred = calloc((size_t)mod->n_experts, sizeof(*mod->pred));
    mod->pred_scratch = calloc(2 * (size_t)mod->n_experts, sizeof(*mod->pred_scratch));
    mod->pf_used = calloc((size_t)mod->n_layers, sizeof(*mod->pf_used));
    mod->pf_expect = calloc((size_t)mod->n_layers, sizeof(*mod->pf_expect));
    mod->miss_steps = 1.0; /* until measured: every step misses (the cautious side) */
    if (mod->n_moe > 1) {
        mod->cooc =
            calloc((size_t)(mod->n_moe - 1) * mod->n_experts * mod->n_experts, sizeof(float));
        mod->rows = calloc((size_t)(mod->n_moe - 1) * mod->n_experts, sizeof(float));
    }
    if (!mod->entries || !mod->passes || !mod->moe_layer || !mod->pred || !mod->pred_scratch ||
        !mod->pf_used || !mod->pf_expect || (mod->n_moe > 1 && (!mod->cooc || !mod->rows)))
        return moe_error_set(err, -ENOMEM, "out of memory for the cache table of %s", mod->name);
    for (int l = 0; l < mod->n_layers; l++)
        if (mod->moe_idx[l] >= 0)
            mod->moe_layer[mod->moe_idx[l]] = l;
    mod->cur_idx = -1;
    mod->pred_idx = -1;
    mod->prev_idx = -1;
    for (int l = 0; l < mod->n_layers; l++) {
        for (int x = 0; x < mod->n_experts; x++) {
            struct centry *e = &mod->entries[(size_t)l * mod->n_experts + x];

            e->mod = mod;
            e->layer = l;
            e->expert = x;
            e->cache = c;
            if (mod->moe_idx[l] < 0)
                continue;
            e->t = calloc((size_t)c->n_tiers, sizeof(*e->t));
            if (!e->t)
                return moe_error_set(err, -ENOMEM, "out of memory for the cache table of %s",
                                     mod->name);
            for (k = 0; k < c->n_tiers; k++)
                moe_pnode_init(&e->t[k].node, e->t[k].ghost, mod->base_group + l, mod->id, l, x);
            if (mod->m)
                entry_layout(e, &mod->m->layers[l].experts[x], mod->pager_file);
            else
                e->bytes = align_up(mod->expert_bytes ? mod->expert_bytes : 1);
        }
    }
    /* Register: the model's slot and its policy groups. */
    gm = realloc(c->group_model, (size_t)(c->n_groups + mod->n_layers) * sizeof(*gm));
    if (!gm)
        return moe_error_set(err, -ENOMEM, "out of memory");
    c->group_model = gm;
    for (k = 0; k < c->n_tiers; k++)
        if (moe_policy_grow(&c->tiers[k].policy, c->n_groups + mod->n_layers) < 0)
            return moe_error_set(err, -ENOMEM, "out of memory");
    ms = realloc(c->models, (size_t)(c->n_models + 1) * sizeof(*ms));
    if (!ms)
        return moe_error_set(err, -ENOMEM, "out of memory");
    c->models = ms;
    mod->base_group = c->n_groups;
    for (int l = 0; l < mod->n_layers; l++) {
        gm[c->n_groups + l] = mod;
        if (mod->entries && mod->moe_idx[l] >= 0)
            for (int x = 0; x < mod->n_experts; x++)
                for (k = 0; k < c->n_tiers; k++)
                    mod->entries[(size_t)l * mod->n_experts + x].t[k].node.group = c->n_groups + l;
    }
    c->n_groups += mod->n_layers;
    c->env.n_groups = c->n_groups;
    mod->id = c->n_models;
    for (int l = 0; l < mod->n_layers; l++)
        if (mod->moe_idx[l] >= 0)
            for (int x = 0; x < mod->n_experts; x++)
                for (k = 0; k < c->n_tiers; k++)
                    mod->entries[(size_t)l * mod->n_experts + x].t[k].node.model = mod->id;
    c->models[c->n_models++] = mod;
    mod->registered = true;
    return 0;
}

int moe_cache_add_model(struct moe_cache *c, const struct moe_model *m, const char *name, int *ret,
                        struct moe_error *err)
{
    struct cmodel *mod = calloc(1, sizeof(*mod));
    int r = 0;

    if (!mod)
        return moe_error_set(err, -ENOMEM, "out of memory");
    snprintf(mod->name, sizeof(mod->name), "%s", name ? name : m->dir);
    mod->m = m;
    mod->n_layers = m->cfg.n_layers;
    mod->n_experts = m->cfg.n_experts;
    mod->top_k = m->cfg.top_k;
    mod->expert_bytes = m->expert_bytes;
    mod->moe_idx = malloc((size_t)mod->n_layers * sizeof(int));
    mod->pager_file = calloc(m->n_files ? m->n_files : 1, sizeof(int));
    if (!mod->moe_idx || !mod->pager_file) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    for (int l = 0; l < mod->n_layers; l++)
        mod->moe_idx[l] = m->layers[l].is_moe ? mod->n_moe++ : -1;
    if (c->pager) {
        for (size_t i = 0; i < m->n_files; i++) {
            r = moe_pager_add_file(c->pager, m->files[i].path, m->files[i].size,
                                   &mod->pager_file[i], err);
            if (r < 0)
                goto fail;
            mod->n_pager_files++;
        }
    }
    pthread_mutex_lock(&c->lock);
    r = model_common(c, mod, err);
    pthread_mutex_unlock(&c->lock);
    if (r < 0)
        goto fail;
    *ret = mod->id;
    return 0;
fail:
    pthread_mutex_lock(&c->lock);
    if (!mod->registered)
        model_free(c, mod);
    pthread_mutex_unlock(&c->lock);
    return r;
}

int moe_cache_add_shape(struct moe_cache *c, const char *name, int n_layers, int n_experts,
                        int top_k, uint64_t expert_bytes, int *ret, struct moe_error *err)
{
    struct cmodel *mod;
    int r;

    if (n_layers < 1 || n_layers > MOE_MAX_LAYERS || n_experts < 1 || n_experts > 65535 ||
        top_k < 1 || top_k > n_experts)
        return moe_error_set(err, -EINVAL,
                             "model shape %d layers x %d experts, top-%d: expected 1 to %d "
                             "layers, 1 to 65535 experts and 1 <= top-k <= experts",
                             n_layers, n_experts, top_k, MOE_MAX_LAYERS);
    mod = calloc(1, sizeof(*mod));
    if (!mod)
        return moe_error_set(err, -ENOMEM, "out of memory");
    snprintf(mod->name, sizeof(mod->name), "%s", name ? name : "shape");
    mod->n_layers = n_layers;
    mod->n_experts = n_experts;
    mod->top_k = top_k;
    mod->expert_bytes = expert_bytes;
    mod->moe_idx = malloc((size_t)n_layers * sizeof(int));
    if (!mod->moe_idx) {
        free(mod);
        return moe_error_set(err, -ENOMEM, "out of memory");
    }
    for (int l = 0; l < n_layers; l++)
        mod->moe_idx[l] = mod->n_moe++;
    pthread_mutex_lock(&c->lock);
    r = model_common(c, mod, err);
    if (r < 0 && !mod->registered)
        model_free(c, mod);
    pthread_mutex_unlock(&c->lock);
    if (r == 0)
        *ret = mod->id;
    return r;
}

static struct cmodel *get_model(struct moe_cache *c, int model)
{
    return model >= 0 && model < c->n_models ? c->models[model] : NULL;
}

int moe_cache_remove_model(struct moe_cache *c, int model, struct moe_error *err)
{
    struct cmodel *mod;

    pthread_mutex_lock(&c->lock);
    mod = get_model(c, model);
    if (!mod) {
        pthread_mutex_unlock(&c->lock);
        return moe_error_set(err, -ENOENT, "no model %d in the cache", model);
    }
    /* Page-ins in flight (prefetches the model's last requests started)
     * finish on their own: wait for them, or the model would stay, its
     * files open, after its requests are done. */
    for (int i = 0; i < mod->n_layers * mod->n_experts; i++) {
        struct centry *e = &mod->entries[i];

        if (e->refs || e->holds) {
            pthread_mutex_unlock(&c->lock);
            return moe_error_set(err, -EBUSY,
                                 "model %s is in use (layer %d expert %d is in use): try again "
                                 "when its requests are done",
                                 mod->name, e->layer, e->expert);
        }
        if (e->loading) {
            /* The lock was let go: look at every entry again. */
            while (e->loading)
                pthread_cond_wait(&c->cv, &c->lock);
            i = -1;
        }
    }
    model_free(c, mod);
    c->models[model] = NULL;
    pthread_mutex_unlock(&c->lock);
    return 0;
}

/* ---- residency ----------------------------------------------------------------------------- */

static struct centry *get_entry(struct cmodel *mod, int layer, int expert)
{
    return &mod->entries[(size_t)layer * mod->n_experts + expert];
}

static void lat_record(struct tier_state *ts, uint64_t ns)
{
    int b = ns ? 63 - __builtin_clzll(ns) : 0;
    uint64_t max = atomic_load_explicit(&ts->lat_max, memory_order_relaxed);

    inc(&ts->hist[b], 1);
    inc(&ts->lat_count, 1);
    inc(&ts->lat_sum, ns);
    while (ns > max && !atomic_compare_exchange_weak_explicit(
                           &ts->lat_max, &max, ns, memory_order_relaxed, memory_order_relaxed))
        ;
}

/* Decay of the throttle's counts per prefetch resolved (about the last
 * hundred of a layer's prefetches count). */
#define PF_DECAY 0.99

/* A prefetch of e turned out used or wasted (lock held): the throttle's
 * counts of its layer. */
static void pf_resolve(struct centry *e, bool used)
{
    struct cmodel *mod = e->mod;

    mod->pf_used[e->layer] = mod->pf_used[e->layer] * PF_DECAY + (used ? 1.0 : 0.0);
    mod->pf_expect[e->layer] = mod->pf_expect[e->layer] * PF_DECAY + e->pf_prob;
}

/* Drops e from tier k (it is resident there and evictable). */
static void drop(struct moe_cache *c, struct centry *e, int k, bool eviction)
{
    struct tier_state *ts = &c->tiers[k];
    struct tier_slot *s = &e->t[k];

    ts->t->ops->free(ts->t, s->data, e->bytes);
    ts->used -= e->bytes;
    ts->resident--;
    s->data = NULL;
    s->state = SLOT_ABSENT;
    ts->policy.ops->remove(&ts->policy, &s->node);
    s->node.resident = false;
    if (eviction) {
        inc(&ts->ctr.evictions, 1);
        inc(&e->ctr.evictions, 1);
        inc(&c->total.evictions, 1);
    }
    if (k == 0)
        e->warm = false;
    /* A prefetched expert that leaves tier 0 unused was a wasted prefetch. */
    if (k == 0 && e->prefetched) {
        e->prefetched = false;
        c->prefetch_used -= e->bytes;
        pf_resolve(e, false);
        inc(&ts->ctr.wasted_prefetches, 1);
        inc(&e->ctr.wasted_prefetches, 1);
        inc(&c->total.wasted_prefetches, 1);
        inc(&ts->ctr.wasted_bytes, e->bytes);
        inc(&e->ctr.wasted_bytes, e->bytes);
        inc(&c->total.wasted_bytes, e->bytes);
    }
}

struct evict_ctx {
    struct moe_cache *c;
    int tier;
};

static bool evictable(struct moe_pnode *n, void *arg)
{
    struct evict_ctx *x = arg;
    struct cmodel *mod = x->c->models[n->model];
    struct centry *e = get_entry(mod, n->layer, n->expert);

    return e->t[x->tier].state == SLOT_RESIDENT && !e->op_pinned && e->holds == 0 &&
           !(x->tier == 0 && e->refs > 0) && !e->loading;
}

/*
 * Makes room for bytes in tier k and takes a block: evicts what the policy
 * picks (never pinned, held or loading experts).  With prefetch_prob >= 0 (a
 * prefetch into group), evicts only victims the policy would rather lose.
 * Returns 0 with *ret, -ENOSPC when everything evictable is gone, -E2BIG
 * when bytes exceed the tier's capacity, -EAGAIN (only with wait) after
 * waiting for page-ins in flight to finish (the lock was dropped: look at
 * the expert again).
 */
static int make_room(struct moe_cache *c, int k, uint64_t bytes, int group, double prefetch_prob,
                     bool wait, void **ret)
{
    struct tier_state *ts = &c->tiers[k];
    struct evict_ctx x = {c, k};

    if (bytes > ts->t->capacity)
        return -E2BIG;
    for (;;) {
        struct moe_pnode *v;

        if (ts->used + bytes <= ts->t->capacity) {
            void *p = ts->t->ops->alloc(ts->t, bytes);

            if (p) {
                ts->used += bytes;
                *ret = p;
                return 0;
            }
        }
        v = ts->policy.ops->victim(&ts->policy, evictable, &x);
        if (!v && wait && c->loading > 0) {
            /* Everything is pinned or on its way in: a page-in finishing
             * may free a slot (its batch done with it).  The caller looks
             * at its expert again after the wait. */
            pthread_cond_wait(&c->cv, &c->lock);
            return -EAGAIN;
        }
        if (!v)
            return -ENOSPC;
        if (prefetch_prob >= 0 && !ts->policy.ops->prefer(&ts->policy, group, prefetch_prob, v))
            return -ENOSPC;
        drop(c, get_entry(c->models[v->model], v->layer, v->expert), k, true);
    }
}

static void place(struct moe_cache *c, struct centry *e, int k, void *p, uint8_t state)
{
    struct tier_state *ts = &c->tiers[k];

    e->t[k].data = p;
    e->t[k].state = state;
    ts->resident++;
    e->t[k].node.resident = true;
    ts->policy.ops->insert(&ts->policy, &e->t[k].node);
}

static void weights_of(const struct centry *e, struct moe_expert_weights *w)
{
    const struct moe_model *m = e->mod->m;
    uint8_t *base = e->t[0].data;

    memset(w, 0, sizeof(*w));
    if (!m) {
        w->gate = w->up = w->down = base;
        return;
    }
    const struct moe_expert_ref *x = &m->layers[e->layer].experts[e->expert];

    w->dtype = x->gate.dtype;
    w->hidden = x->gate.cols;
    w->ffn = x->gate.rows;
    w->gate = base + e->toff[0];
    w->up = base + e->toff[1];
    w->down = base + e->toff[2];
    if (x->quant.q != MOE_QUANT_NONE) {
        w->quant = x->quant;
        w->gate_s = base + e->toff[3];
        w->up_s = base + e->toff[4];
        w->down_s = base + e->toff[5];
    }
}

static int upload(struct moe_cache *c, struct centry *e, int from, int to)
{
    struct moe_tier *t = c->tiers[to].t;

    if (c->cfg.simulate)
        return 0;
    if (t->ops->upload)
        return t->ops->upload(t, e->t[to].data, e->t[from].data, e->bytes);
    memcpy(e->t[to].data, e->t[from].data, e->bytes);
    return 0;
}

static void page_in_done(struct moe_pager_job *job, int status, const char *msg);

/* Longest automatic back-off, in multiples of the first. */
#define RETRY_MAX_FACTOR 64

/* Sets e's back-off after a failed page-in (lock held): doubled from the
 * last, and whether one of its files is modified (it is retried at once
 * when put back). */
static void mark_retry(struct moe_cache *c, struct centry *e)
{
    uint32_t first = c->cfg.retry_ms ? c->cfg.retry_ms : 10000;

    e->retry_ms = !e->retry_ms ? first : MOE_MIN(e->retry_ms * 2, first * RETRY_MAX_FACTOR);
    e->retry_at = moe_now_ns() + (uint64_t)e->retry_ms * 1000000;
    e->bad_ident = false;
    for (int i = 0; i < e->n_segs && c->pager; i++)
        e->bad_ident |= moe_pager_file_unchanged(c->pager, e->segs[i].file) == 0;
}

/* Clears e's bad mark (lock held). */
static void clear_bad(struct centry *e)
{
    e->bad = false;
    free(e->bad_msg);
    e->bad_msg = NULL;
    e->bad_code = 0;
    atomic_fetch_sub_explicit(&e->mod->bad_experts, 1, memory_order_relaxed);
}

/*
 * Whether bad e is due for an automatic retry at this use (lock held): its
 * back-off has passed, or it failed on a modified file and every file of it
 * has its loaded identity again.  Never for a shape (no I/O to retry).
 */
static bool retry_due(struct moe_cache *c, struct centry *e)
{
    if (c->cfg.simulate)
        return false;
    if (moe_now_ns() >= e->retry_at)
        return true;
    if (!e->bad_ident || !c->pager)
        return false;
    for (int i = 0; i < e->n_segs; i++)
        if (moe_pager_file_unchanged(c->pager, e->segs[i].file) != 1)
            return false;
    return true;
}

/* Publishes the result of a page-in (lock held). */
static void finish_load(struct moe_cache *c, struct centry *e, int status, const char *msg)
{
    int last = e->load_tier;
    uint64_t now = c->cfg.simulate ? 0 : moe_now_ns(), ns = now - e->load_t0;

    if (status == 0) {
        /* Upper tiers got their blocks when the read started. */
        for (int k = last - 1; k >= 0 && status == 0; k--) {
            if (e->t[k].state != SLOT_LOADING)
                continue;
            status = upload(c, e, last, k);
            if (status < 0)
                msg = "copying the expert to a nearer tier failed";
        }
    }
    for (int k = last; k >= 0; k--) {
        if (e->t[k].state != SLOT_LOADING)
            continue;
        if (status == 0)
            e->t[k].state = SLOT_RESIDENT;
        else
            drop(c, e, k, false);
    }
    if (status == 0) {
        struct tier_state *ts = &c->tiers[last];

        inc(&ts->ctr.page_ins, 1);
        inc(&ts->ctr.bytes_paged, e->bytes);
        inc(&e->ctr.page_ins, 1);
        inc(&e->ctr.bytes_paged, e->bytes);
        inc(&c->total.page_ins, 1);
        inc(&c->total.bytes_paged, e->bytes);
        lat_record(ts, ns);
        e->retry_ms = 0; /* the next failure starts its back-off anew */
        if (!c->cfg.simulate) {
            /* The disk's throughput: bytes per time between completions
             * (reads overlap), or since this read started on an idle disk. */
            uint64_t since = MOE_MAX(e->load_t0, c->read_done);
            double spb = (double)(now - since) / 1e9 / (double)e->bytes;

            c->read_s_per_byte =
                c->read_s_per_byte > 0 ? 0.8 * c->read_s_per_byte + 0.2 * spb : spb;
        }
    } else {
        char buf[MOE_ERROR_MSG_MAX];

        snprintf(buf, sizeof(buf), "layer %d expert %d of %s: %s", e->layer, e->expert,
                 e->mod->name, msg ? msg : strerror(-status));
        free(e->bad_msg);
        e->bad_msg = strdup(buf);
        e->bad_code = status;
        mark_retry(c, e);
        if (!e->bad)
            atomic_fetch_add_explicit(&e->mod->bad_experts, 1, memory_order_relaxed);
        e->bad = true;
        if (e->prefetched) {
            e->prefetched = false;
            c->prefetch_used -= e->bytes;
        }
        inc(&c->tiers[last].ctr.page_in_errors, 1);
        inc(&e->ctr.page_in_errors, 1);
        inc(&c->total.page_in_errors, 1);
        moe_log(MOE_LOG_ERROR, "cache: page-in failed: %s (marked bad until retried)", buf);
    }
    e->loading = false;
    c->loading--;
    c->reading -= e->bytes;
    c->read_done = now;
    pthread_cond_broadcast(&c->cv);
}

static void page_in_done(struct moe_pager_job *job, int status, const char *msg);

/* The hash of a checkpoint expert's tensors in its slot: each tensor's
 * bytes, chained through the seed (the spans around them hold other
 * tensors' bytes, or zeros past the file's end). */
static uint64_t slot_sum(const struct centry *e, const struct moe_expert_ref *x)
{
    const uint8_t *slot = e->t[e->load_tier].data;
    /* Each tensor's bytes (values, then a quantized expert's scales),
     * chained through the seed (the spans around them hold other tensors'
     * bytes, or zeros past the file's end). */
    const struct moe_tensor_ref *t[6];
    int n = moe_expert_tensors(x, t);
    uint64_t h = 0;

    for (int i = 0; i < n; i++)
        h = XXH3_64bits_withSeed(slot + e->toff[i], t[i]->nbytes, h);
    return h;
}

/*
 * Pager thread: reads e's page-in again into the same slot, its first read
 * having hashed to h.  0: page_in_done() runs again for the second read;
 * -errno with err: the page-in fails.
 */
static int reread(struct centry *e, uint64_t h, struct moe_error *err)
{
    e->rereading = true;
    e->first_sum = h;
    e->job.done = page_in_done;
    if (moe_pager_submit(e->cache->pager, &e->job, err) == 0)
        return 0;
    e->rereading = false;
    return err->code;
}

/*
 * Pager thread: checksum, then publish.
 *
 * A packed store's expert is checked against the checksum in its index.  A
 * checkpoint's expert has none: the bytes of its first page-in become its
 * checksum, against which later page-ins are checked.  A checksum taken
 * from one read would make a read gone wrong the reference (every later,
 * right read then fails, and no retry clears it), so the first page-in is
 * read twice and its checksum taken only when both reads agree; a later
 * page-in that does not match is read again too, to tell a read gone wrong
 * (the second read matches: served; the two disagree: -EIO) from a file
 * changed since load (both reads agree on other bytes: -EBADMSG).  What
 * two reads cannot tell is a disk that returns the same wrong bytes every
 * time; a packed store's checksum does (moectl pack).
 */
static void page_in_done(struct moe_pager_job *job, int status, const char *msg)
{
    struct centry *e = job->arg;
    struct moe_cache *c = e->cache;
    const struct moe_model *m = e->mod->m;
    const struct moe_expert_ref *x = &m->layers[e->layer].experts[e->expert];
    bool second = e->rereading;
    struct moe_error err = {0};
    char buf[512];

    e->rereading = false;
    if (status == 0 && x->has_xxh3) {
        const uint8_t *p = (const uint8_t *)e->t[e->load_tier].data + e->toff[0];
        uint64_t h = XXH3_64bits(p, x->nbytes);

        if (h != x->xxh3) {
            snprintf(buf, sizeof(buf),
                     "checksum mismatch in %s at offset %" PRIu64 ": the index says %016" PRIx64
                     ", the %" PRIu64 " bytes read hash to %016" PRIx64,
                     m->files[x->gate.file].name, x->gate.offset, x->xxh3, x->nbytes, h);
            status = -EBADMSG;
            msg = buf;
        }
    } else if (status == 0) {
        uint64_t h = slot_sum(e, x);

        if (e->summed && h == e->sum) {
            if (second)
                moe_log(MOE_LOG_WARN,
                        "cache: a read of layer %d expert %d of %s from %s came back different "
                        "(hash %016" PRIx64 ", expected %016" PRIx64 "); read again, it is whole",
                        e->layer, e->expert, e->mod->name, m->files[x->gate.file].name,
                        e->first_sum, h);
        } else if (!second) {
            status = reread(e, h, &err);
            if (status == 0)
                return;
            msg = err.msg;
        } else if (h != e->first_sum) {
            snprintf(buf, sizeof(buf),
                     "two reads of its %" PRIu64 " bytes from %s disagree (hashes %016" PRIx64
                     " and %016" PRIx64 "): the disk or the path to it returned wrong bytes",
                     x->nbytes, m->files[x->gate.file].name, e->first_sum, h);
            status = -EIO;
            msg = buf;
        } else if (!e->summed) {
            e->sum = h;
            e->summed = true;
        } else {
            snprintf(buf, sizeof(buf),
                     "checksum mismatch in %s: its %" PRIu64 " bytes hashed to %016" PRIx64
                     " at their first page-in, to %016" PRIx64
                     " now (read twice): the file changed since it was loaded",
                     m->files[x->gate.file].name, x->nbytes, e->sum, h);
            status = -EBADMSG;
            msg = buf;
        }
    }
    /* A quantized expert's scales: NaN, infinite or negative ones would
     * make every output of the expert garbage; the page-in fails instead,
     * naming the tensor (they are a few KiB: checked at every page-in). */
    if (status == 0 && x->quant.q != MOE_QUANT_NONE && !c->cfg.simulate) {
        const uint8_t *slot = e->t[e->load_tier].data;
        const struct moe_tensor_ref *t[6];
        struct moe_error qerr = {0};

        moe_expert_tensors(x, t);
        for (int i = 3; i < 6 && status == 0; i++) {
            /* gpt-oss's MXFP4 gate and up scales are one slice of the
             * fused tensor, rows interleaved: checked as stored, so that
             * the index is the scale's in the expert's slice */
            bool il = x->interleaved && i == 3;
            uint64_t n = t[i]->nbytes * (il ? 2 : 1) / moe_quant_scale_size(x->quant.q);

            if (x->interleaved && i == 4)
                continue;
            if (moe_quant_check_scales(x->quant.q, slot + e->toff[i], n, t[i]->name, &qerr) < 0) {
                if (t[i]->slice)
                    snprintf(buf, sizeof(buf), "%s: %.400s (the index in expert %d's slice)",
                             m->files[t[i]->file].name, qerr.msg, e->expert);
                else
                    snprintf(buf, sizeof(buf), "%s: %.400s", m->files[t[i]->file].name, qerr.msg);
                status = -EINVAL;
                msg = buf;
            }
        }
    }
    /* gpt-oss's MXFP4 experts: gate and up rows interleaved as stored;
     * made plain once, here, after the checksum (as below). */
    if (status == 0 && x->interleaved && !x->transposed && !c->cfg.simulate) {
        uint8_t *slot = e->t[e->load_tier].data;

        assert(e->toff[1] == e->toff[0] + x->gate.nbytes &&
               e->toff[4] == e->toff[3] + x->gate_s.nbytes);
        if (moe_expert_deinterleave(x, slot + e->toff[0], slot + e->toff[3]) < 0) {
            status = -ENOMEM;
            msg = "out of memory making an interleaved expert plain";
        }
    }
    /* Llama 4's experts are stored transposed: the cache's copy is made
     * plain once, here, after the checksum (which covers the bytes as read),
     * so that the tiers above and the kernels see [out, in] matrices. */
    if (status == 0 && x->transposed && !c->cfg.simulate) {
        uint8_t *slot = e->t[e->load_tier].data;

        if (moe_expert_untranspose(x, slot + e->toff[0], slot + e->toff[1], slot + e->toff[2]) <
            0) {
            status = -ENOMEM;
            msg = "out of memory making a transposed expert plain";
        }
    }
    pthread_mutex_lock(&c->lock);
    finish_load(c, e, status, msg);
    pthread_mutex_unlock(&c->lock);
}

/*
 * Starts getting e into tier 0 (lock held): from the nearest lower tier
 * holding it, or from its file.  prefetch_prob < 0 for a demand load; wait:
 * when nothing is evictable, wait for page-ins in flight (make_room).
 * Returns 0 (ready at once: an upload), 1 (page-in started), or -errno.
 */
static int start_load(struct moe_cache *c, struct centry *e, double prefetch_prob, bool wait,
                      struct moe_error *err)
{
    int last = c->n_tiers - 1, from = -1, group = e->t[0].node.group, r;
    void *p[MOE_CACHE_MAX_TIERS] = {0};

    for (int k = 1; k <= last; k++)
        if (e->t[k].state == SLOT_RESIDENT) {
            from = k;
            break;
        }
    /* Room in every tier the expert enters: 0 .. from - 1, or 0 .. last. */
    int top = from >= 0 ? from - 1 : last;

    for (int k = 0; k <= top; k++) {
        r = make_room(c, k, e->bytes, group, prefetch_prob, wait, &p[k]);
        if (r < 0) {
            for (int j = 0; j < k; j++) {
                c->tiers[j].t->ops->free(c->tiers[j].t, p[j], e->bytes);
                c->tiers[j].used -= e->bytes;
            }
            if (r == -E2BIG)
                return moe_error_set(err, -E2BIG,
                                     "layer %d expert %d needs %" PRIu64
                                     " bytes but the %s tier holds only %" PRIu64,
                                     e->layer, e->expert, e->bytes, c->tiers[k].t->name,
                                     c->tiers[k].t->capacity);
            return r;
        }
    }
    if (from >= 0) {
        /* Copy from the lower tier: synchronous for host-memory tiers. */
        for (int k = top; k >= 0; k--) {
            place(c, e, k, p[k], SLOT_RESIDENT);
            r = upload(c, e, from, k);
            if (r < 0) {
                for (int j = k; j <= top; j++)
                    drop(c, e, j, false);
                return moe_error_set(err, r, "copying layer %d expert %d to the %s tier failed",
                                     e->layer, e->expert, c->tiers[k].t->name);
            }
        }
        inc(&c->tiers[from].ctr.hits, 1);
        return 0;
    }
    for (int k = 0; k <= last; k++)
        place(c, e, k, p[k], SLOT_LOADING);
    e->loading = true;
    e->load_tier = last;
    e->load_t0 = c->cfg.simulate ? 0 : moe_now_ns();
    c->loading++;
    c->reading += e->bytes;
    if (last > 0)
        inc(&c->tiers[last].ctr.misses, 1);
    if (c->cfg.simulate) {
        if (c->cfg.disk && c->cfg.disk->read)
            c->cfg.disk->read(c->cfg.disk->arg, e->mod->id, e->layer, e->expert,
                              prefetch_prob >= 0);
        finish_load(c, e, 0, NULL);
        return 0;
    }
    /* Read into the last tier's block (the layout's dst are slot offsets). */
    {
        uint8_t *base = e->t[last].data;

        for (int i = 0; i < e->n_segs; i++) {
            e->io[i] = e->segs[i];
            e->io[i].dst = base + (uintptr_t)e->segs[i].dst;
        }
        memset(&e->job, 0, sizeof(e->job));
        e->job.segs = e->io;
        e->job.n_segs = e->n_segs;
        e->job.done = page_in_done;
        e->job.arg = e;
        /* A batch waits for a demand page-in: it goes before prefetches. */
        e->job.urgent = prefetch_prob < 0;
        r = moe_pager_submit(c->pager, &e->job, err);
        if (r < 0) {
            finish_load(c, e, r, err ? err->msg : NULL);
            return r;
        }
    }
    return 1;
}

/* ---- batches -------------------------------------------------------------------------------- */

static void count_use(struct moe_cache *c, struct centry *e, bool hit)
{
    struct tier_state *t0 = &c->tiers[0];

    if (hit) {
        inc(&t0->ctr.hits, 1);
        inc(&e->ctr.hits, 1);
        inc(&c->total.hits, 1);
    } else {
        inc(&t0->ctr.misses, 1);
        inc(&e->ctr.misses, 1);
        inc(&c->total.misses, 1);
    }
    if (e->warm) {
        e->warm = false;
        inc(&t0->ctr.warm_hits, 1);
        inc(&e->ctr.warm_hits, 1);
        inc(&c->total.warm_hits, 1);
    }
    if (e->prefetched) {
        e->prefetched = false;
        c->prefetch_used -= e->bytes;
        pf_resolve(e, true);
        inc(&t0->ctr.prefetch_hits, 1);
        inc(&e->ctr.prefetch_hits, 1);
        inc(&c->total.prefetch_hits, 1);
    }
}

static int check_layer(struct moe_cache *c, int model, int layer, struct cmodel **ret,
                       struct moe_error *err)
{
    struct cmodel *mod = get_model(c, model);

    if (!mod)
        return moe_error_set(err, -ENOENT, "no model %d in the cache", model);
    if (layer < 0 || layer >= mod->n_layers)
        return moe_error_set(err, -EINVAL,
                             "%s: layer %d out of range: the model has layers 0 to %d", mod->name,
                             layer, mod->n_layers - 1);
    if (mod->moe_idx[layer] < 0)
        return moe_error_set(err, -EINVAL, "%s: layer %d is a dense layer: it has no experts",
                             mod->name, layer);
    *ret = mod;
    return 0;
}

static void release_locked(struct moe_cache_ref *refs, int n)
{
    for (int i = 0; i < n; i++) {
        struct centry *e = refs[i].entry_;

        if (e && refs[i].pinned_) {
            e->refs--;
            refs[i].pinned_ = false;
        }
    }
}

/* Internal to moe_cache_acquire: a ref whose expert is still to be loaded. */
#define REF_MISSING 1

/* Pins ref's expert for the batch (lock held). */
static void ref_pin(struct moe_cache_ref *ref, struct centry *e)
{
    e->refs++;
    ref->pinned_ = true;
}

/*
 * Lets the batch go of refs [from, to) (lock held): unpinned, no longer
 * held, status -ENOSPC, so that the caller acquires them again once it is
 * done with the ones before.
 */
static void defer_refs(struct moe_cache_ref *refs, int from, int to)
{
    for (int i = from; i < to; i++) {
        struct centry *e = refs[i].entry_;

        release_locked(&refs[i], 1);
        e->holds--;
        refs[i].status = -ENOSPC;
        refs[i].hit = false;
    }
}

/*
 * Sets refs[i].status from its expert's state (lock held): a hit when
 * resident in tier 0, -EINPROGRESS when on its way (pinned then), the bad
 * mark's code, or REF_MISSING.
 */
static void ref_look(struct moe_cache *c, struct moe_cache_ref *ref, struct centry *e)
{
    if (e->bad && retry_due(c, e)) {
        moe_log(MOE_LOG_INFO, "cache: retrying layer %d expert %d of %s, marked bad %s", e->layer,
                e->expert, e->mod->name,
                moe_now_ns() >= e->retry_at ? "(its back-off passed)" : "(its file is put back)");
        clear_bad(e); /* its back-off stays: a new failure doubles it */
    }
    if (e->bad) {
        ref->status = e->bad_code;
    } else if (e->t[0].state == SLOT_RESIDENT) {
        ref->hit = true;
        ref->status = 0;
        ref_pin(ref, e);
    } else if (e->t[0].state == SLOT_LOADING) {
        ref->status = -EINPROGRESS; /* single flight: wait on that page-in */
        ref_pin(ref, e);
    } else {
        ref->status = REF_MISSING;
    }
}

/*
 * Loads the missing expert of refs[i] (lock held).  Every expert of
 * refs[0, *limit) is held, so making room evicts none of them.  Without room:
 * when the batch holds pins before i, it stops at i (*limit = i: those are
 * computed first, then released); otherwise it lets go of its last experts
 * one by one, evictable again, until the one at i fits; when i is alone,
 * it waits for page-ins in flight as make_room does, then stops at i.
 * 0 (refs[i] settled, or deferred), or -E2BIG with err.
 */
static int load_missing(struct moe_cache *c, struct moe_cache_ref *refs, int i, int *limit,
                        struct moe_error *err)
{
    struct moe_cache_ref *ref = &refs[i];
    struct centry *e = ref->entry_;
    bool wait = false;

    for (;;) {
        struct moe_error lerr;
        bool progress = false;
        int r;

        ref_look(c, ref, e); /* again after a wait: another batch may have loaded it */
        if (ref->status != REF_MISSING)
            return 0;
        r = start_load(c, e, -1.0, wait, &lerr);
        if (r >= 0) {
            ref->status = r == 0 ? 0 : -EINPROGRESS;
            ref_pin(ref, e);
            return 0;
        }
        if (r == -EAGAIN)
            continue;
        if (r == -E2BIG)
            return moe_error_set(err, r, "%s", lerr.msg);
        if (r != -ENOSPC) {
            /* start_load marked it bad (submit refused). */
            ref->status = r;
            return 0;
        }
        for (int j = 0; j < i && !progress; j++)
            progress = refs[j].pinned_;
        if (!progress && *limit - 1 > i) {
            defer_refs(refs, *limit - 1, *limit);
            (*limit)--;
            continue;
        }
        if (!progress && !wait) {
            wait = true;
            continue;
        }
        defer_refs(refs, i, *limit);
        *limit = i;
        return 0;
    }
}

/* Decay per step of cmodel.miss_steps: about the last 30 steps count. */
#define MISS_DECAY 0.97

int moe_cache_acquire(struct moe_cache *c, int model, int layer, const int32_t *experts, int n,
                      struct moe_cache_ref *refs, struct moe_error *err)
{
    struct cmodel *mod;
    int r, limit = n;

    pthread_mutex_lock(&c->lock);
    r = check_layer(c, model, layer, &mod, err);
    if (r < 0)
        goto out;
    for (int i = 0; i < n; i++) {
        if (experts[i] < 0 || experts[i] >= mod->n_experts) {
            r = moe_error_set(err, -EINVAL, "%s layer %d: expert %d out of range: 0 to %d",
                              mod->name, layer, experts[i], mod->n_experts - 1);
            goto out;
        }
        for (int j = 0; j < i; j++)
            if (experts[j] == experts[i]) {
                r = moe_error_set(err, -EINVAL, "%s layer %d: expert %d asked for twice", mod->name,
                                  layer, experts[i]);
                goto out;
            }
    }
    /* One pass of the layer: the clocks the policies decay by. */
    mod->passes[layer] += 1.0;
    mod->cur_idx = mod->moe_idx[layer];
    /* Hold the whole batch, then pin what is there: making room for the
     * missing experts below must not evict one the batch is about to use. */
    for (int i = 0; i < n; i++) {
        struct centry *e = get_entry(mod, layer, experts[i]);

        memset(&refs[i], 0, sizeof(refs[i]));
        refs[i].expert = experts[i];
        refs[i].entry_ = e;
        e->holds++;
        ref_look(c, &refs[i], e);
    }
    for (int i = 0; i < limit; i++) {
        if (refs[i].status != REF_MISSING)
            continue;
        r = load_missing(c, refs, i, &limit, err);
        if (r < 0) {
            release_locked(refs, n);
            for (int j = 0; j < limit; j++)
                ((struct centry *)refs[j].entry_)->holds--;
            goto out;
        }
    }
    /* Uses in the batch's order (the lru order among them), counted for the
     * experts it keeps; the deferred ones count when acquired again. */
    for (int i = 0; i < limit; i++) {
        struct centry *e = refs[i].entry_;
        struct moe_cache_ref *ref = &refs[i];

        e->holds--;
        for (int k = 0; k < c->n_tiers; k++)
            c->tiers[k].policy.ops->touch(&c->tiers[k].policy, &e->t[k].node);
        if (!ref->pinned_)
            continue; /* bad */
        count_use(c, e, ref->hit);
        if (ref->status == 0)
            weights_of(e, &ref->w);
    }
    {
        bool missed = false;

        for (int i = 0; i < limit; i++)
            missed |= !refs[i].hit;
        mod->miss_steps = MISS_DECAY * mod->miss_steps + (1.0 - MISS_DECAY) * missed;
    }
    r = 0;
out:
    pthread_mutex_unlock(&c->lock);
    return r;
}

static int ref_result(struct moe_cache_ref *ref, struct centry *e, struct moe_error *err)
{
    if (ref->status == -ENOSPC)
        return moe_error_set(err, -ENOSPC,
                             "layer %d expert %d: no room in the %s tier: every expert there is "
                             "in use or pinned",
                             e->layer, e->expert, e->cache->tiers[0].t->name);
    if (e->bad_msg)
        return moe_error_set(err, ref->status, "%s", e->bad_msg);
    return moe_error_set(err, ref->status, "layer %d expert %d: %s", e->layer, e->expert,
                         strerror(-ref->status));
}

/* Lock held: settles a ref whose page-in has finished. */
static void settle(struct moe_cache_ref *ref, struct centry *e)
{
    if (e->t[0].state == SLOT_RESIDENT) {
        ref->status = 0;
        weights_of(e, &ref->w);
    } else if (!e->loading) {
        ref->status = e->bad ? e->bad_code : -EIO;
    }
}

int moe_cache_wait(struct moe_cache *c, struct moe_cache_ref *ref, struct moe_error *err)
{
    struct centry *e = ref->entry_;

    if (!e)
        return moe_error_set(err, -EINVAL, "expert %d was never acquired", ref->expert);
    if (ref->status == -EINPROGRESS) {
        pthread_mutex_lock(&c->lock);
        while (e->loading && e->t[0].state == SLOT_LOADING)
            pthread_cond_wait(&c->cv, &c->lock);
        settle(ref, e);
        pthread_mutex_unlock(&c->lock);
    }
    if (ref->status == 0)
        return 0;
    return ref_result(ref, e, err);
}

bool moe_cache_ready(struct moe_cache *c, struct moe_cache_ref *ref)
{
    struct centry *e = ref->entry_;

    if (ref->status == -EINPROGRESS && e) {
        pthread_mutex_lock(&c->lock);
        settle(ref, e);
        pthread_mutex_unlock(&c->lock);
    }
    return ref->status != -EINPROGRESS;
}

void moe_cache_release(struct moe_cache *c, struct moe_cache_ref *refs, int n)
{
    pthread_mutex_lock(&c->lock);
    release_locked(refs, n);
    c->releases++;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->lock);
}

int moe_cache_wait_release(struct moe_cache *c, int timeout_ms)
{
    struct timespec ts;
    uint64_t seen;
    int r = 0;

    ts = moe_realtime_after_ms(timeout_ms);
    pthread_mutex_lock(&c->lock);
    seen = c->releases;
    while (c->releases == seen && c->loading == 0 && r == 0)
        if (pthread_cond_timedwait(&c->cv, &c->lock, &ts) == ETIMEDOUT)
            r = -ETIMEDOUT;
    pthread_mutex_unlock(&c->lock);
    return r;
}

/* ---- prediction and prefetch ---------------------------------------------------------------- */

#define PRED_PRIOR 2.0    /* pseudo-uses of the popularity prior per row */
#define PREFETCH_MIN 0.10 /* least probability worth a prefetch */

/*
 * Forecast for MoE layer idx + 1 from the routing ids at MoE layer idx and,
 * when given, the lookahead routing next (the next layer's router on this
 * layer's input).  Per token, an expert in the lookahead is expected with
 * the lookahead's measured precision; the others share the rest of the
 * token's top_k in proportion to the co-occurrence table (with the next
 * layer's popularity as a prior).  Without lookahead, the table alone.
 */
static void predict(struct cmodel *mod, int idx, const int32_t *ids, const int32_t *next,
                    int n_tokens, int K)
{
    const int E = mod->n_experts;
    const float *C = mod->cooc + (size_t)idx * E * E;
    const float *R = mod->rows + (size_t)idx * E;
    int nl = mod->moe_layer[idx + 1];
    double *q = mod->pred, qsum = 0, *logmiss, *pt;
    double acc = (mod->la_hits + 1.0) / (mod->la_total + 2.0);

    /* scratch kept with the model: no allocation under the lock */
    logmiss = mod->pred_scratch;
    pt = mod->pred_scratch + E;
    memset(logmiss, 0, (size_t)E * sizeof(*logmiss));
    /* Popularity prior at the next layer, scaled to sum to top_k. */
    for (int x = 0; x < E; x++) {
        q[x] = get_entry(mod, nl, x)->t[0].node.count;
        qsum += q[x];
    }
    for (int x = 0; x < E; x++)
        q[x] = qsum > 0 ? q[x] * K / qsum : (double)K / E;
    for (int t = 0; t < n_tokens; t++) {
        const int32_t *la = next ? next + (size_t)t * K : NULL;
        double out_sum = 0;

        for (int x = 0; x < E; x++) {
            double p = 0;

            for (int j = 0; j < K; j++) {
                int e = ids[(size_t)t * K + j];

                p += (C[(size_t)e * E + x] + PRED_PRIOR * q[x]) / (R[e] + PRED_PRIOR);
            }
            pt[x] = p / K;
        }
        if (la) {
            for (int j = 0; j < K; j++)
                pt[la[j]] = -1.0; /* in the lookahead */
            for (int x = 0; x < E; x++)
                if (pt[x] >= 0)
                    out_sum += pt[x];
            for (int x = 0; x < E; x++)
                pt[x] = pt[x] < 0 ? acc : (out_sum > 0 ? pt[x] * K * (1.0 - acc) / out_sum : 0.0);
        }
        for (int x = 0; x < E; x++)
            logmiss[x] += log1p(-MOE_MIN(pt[x], 0.999999));
    }
    for (int x = 0; x < E; x++)
        q[x] = -expm1(logmiss[x]); /* P(used by some token of the batch) */
    mod->pred_idx = idx + 1;
}

/* Whether the policy reads the predictor's forecast (moe_policy_env.predicted). */
static bool uses_forecast(enum moe_cache_policy p)
{
    return p == MOE_POLICY_ROUTING || p == MOE_POLICY_ADAPTIVE;
}

/* Prior of the throttle's calibration: pseudo-prefetches used as forecast. */
#define PF_PRIOR 2.0

double moe_cache_read_late(uint64_t backlog, uint64_t bytes, double s_per_byte, double step_s)
{
    double read, late;

    if (!(s_per_byte > 0) || !(step_s > 0) || bytes == 0)
        return 0.0;
    read = (double)bytes * s_per_byte;
    late = ((double)backlog * s_per_byte + read - step_s) / read;
    return MOE_MIN(1.0, MOE_MAX(0.0, late));
}

/*
 * The share of a read of bytes, queued now, that would still hold the disk
 * when the next step starts (lock held), in [0, 1]: what a wasted prefetch
 * costs that step's demand reads, over what a used one saves them.  From
 * the simulated disk, or live: the page-ins in flight, then this read, at
 * the disk's measured throughput, against the model's measured time between
 * steps (0 until both are measured).  Live, demand page-ins go before
 * prefetches in the pager, so a wasted prefetch costs them less than this
 * (a FIFO disk, as cache-sim's): the estimate errs on the cautious side.
 */
static double read_late(struct moe_cache *c, const struct cmodel *mod, uint64_t bytes)
{
    if (c->cfg.disk)
        return c->cfg.disk->late ? c->cfg.disk->late(c->cfg.disk->arg, bytes) : 0.0;
    return moe_cache_read_late(c->reading, bytes, c->read_s_per_byte, mod->step_s);
}

/*
 * Whether a prefetch on forecast p is worth its read (lock held).  q = p *
 * cal is the chance it is used (cal: its layer's calibration).  Used, it
 * saves the next step the part of its read done before that step starts,
 * 1 - late of a read; wasted, it delays by the rest, late, the demand reads
 * of that step, when it has any (miss: the share of steps that do).  It
 * pays when q * (1 - late) > (1 - q) * late * miss, and it must reach the
 * wanted precision.
 */
bool moe_cache_prefetch_worth(double p, double cal, double want, double late, double miss)
{
    double q = p * cal;

    return p >= PREFETCH_MIN && q >= want && q * (1.0 - late) > (1.0 - q) * late * miss;
}

static void prefetch(struct moe_cache *c, struct cmodel *mod)
{
    const int E = mod->n_experts;
    int layer = mod->moe_layer[mod->pred_idx];
    int max = c->cfg.prefetch_max > 0 ? c->cfg.prefetch_max : 2 * mod->top_k;
    bool throttle = c->cfg.prefetch_precision >= 0;
    double want = c->cfg.prefetch_precision > 0 ? c->cfg.prefetch_precision : 0.5;
    /* How far the forecasts of this layer's prefetches came true so far:
     * a forecast p is worth about p * cal. */
    double cal = (mod->pf_used[layer] + PF_PRIOR) / (mod->pf_expect[layer] + PF_PRIOR);

    for (int done = 0; done < max; done++) {
        int best = -1;

        /* the most likely expert not yet on its way */
        for (int x = 0; x < E; x++) {
            struct centry *e = get_entry(mod, layer, x);

            if (e->bad || e->t[0].state != SLOT_ABSENT || mod->pred[x] < PREFETCH_MIN ||
                (mod->prefetch_mask && !mod->prefetch_mask[(size_t)layer * E + x]))
                continue;
            if (best < 0 || mod->pred[x] > mod->pred[best])
                best = x;
        }
        if (best < 0)
            return;
        struct centry *e = get_entry(mod, layer, best);

        /* The best first: when it is not worth its read, no other is. */
        if (throttle && !moe_cache_prefetch_worth(mod->pred[best], cal, want,
                                                  read_late(c, mod, e->bytes), mod->miss_steps))
            return;
        if (c->prefetch_used + e->bytes > c->cfg.prefetch_bytes)
            return;
        if (start_load(c, e, mod->pred[best], false, NULL) < 0)
            return; /* no room the policy would give up */
        if (e->bad)
            return;
        e->prefetched = true;
        e->pf_prob = (float)mod->pred[best];
        c->prefetch_used += e->bytes;
        inc(&c->tiers[0].ctr.prefetches, 1);
        inc(&e->ctr.prefetches, 1);
        inc(&c->total.prefetches, 1);
        inc(&c->tiers[0].ctr.prefetched_bytes, e->bytes);
        inc(&e->ctr.prefetched_bytes, e->bytes);
        inc(&c->total.prefetched_bytes, e->bytes);
    }
}

int moe_cache_set_prefetch_mask(struct moe_cache *c, int model, const uint8_t *mask,
                                struct moe_error *err)
{
    struct cmodel *mod;
    uint8_t *copy = NULL, *old;
    int r = 0;

    pthread_mutex_lock(&c->lock);
    mod = get_model(c, model);
    if (!mod) {
        r = moe_error_set(err, -ENOENT, "no model %d in the cache", model);
        goto out;
    }
    if (mask) {
        size_t n = (size_t)mod->n_layers * (size_t)mod->n_experts;

        copy = malloc(n); /* rare (a rebalance), small: under the lock */
        if (!copy) {
            r = moe_error_set(err, -ENOMEM, "out of memory");
            goto out;
        }
        memcpy(copy, mask, n);
    }
    old = mod->prefetch_mask;
    mod->prefetch_mask = copy;
    free(old);
out:
    pthread_mutex_unlock(&c->lock);
    return r;
}

void moe_cache_observe(struct moe_cache *c, int model, int layer, const int32_t *ids, int n_tokens,
                       int top_k)
{
    moe_cache_observe_ahead(c, model, layer, ids, NULL, n_tokens, top_k);
}

/* ids [n, K] holds distinct experts below E in every row. */
static bool rows_ok(const int32_t *ids, int n, int K, int E)
{
    for (int t = 0; t < n; t++)
        for (int j = 0; j < K; j++) {
            int32_t e = ids[(size_t)t * K + j];

            if (e < 0 || e >= E)
                return false;
            for (int i = 0; i < j; i++)
                if (ids[(size_t)t * K + i] == e)
                    return false;
        }
    return true;
}

static bool grow_ids(int32_t **p, int *cap, size_t n)
{
    int32_t *q;

    if ((size_t)*cap >= n)
        return true;
    q = realloc(*p, n * sizeof(*q));
    if (!q)
        return false;
    *p = q;
    *cap = (int)n;
    return true;
}

void moe_cache_observe_ahead(struct moe_cache *c, int model, int layer, const int32_t *ids,
                             const int32_t *next, int n_tokens, int top_k)
{
    struct cmodel *mod;
    int idx, K = top_k, E;
    size_t n = (size_t)n_tokens * (size_t)top_k;

    pthread_mutex_lock(&c->lock);
    if (check_layer(c, model, layer, &mod, NULL) < 0 || top_k != mod->top_k || n_tokens < 1 ||
        n_tokens > MOE_CACHE_MAX_OBSERVE)
        goto out;
    idx = mod->moe_idx[layer];
    E = mod->n_experts;
    if (!rows_ok(ids, n_tokens, K, E))
        goto out;
    if (!c->cfg.simulate) {
        /* The time between steps, for the throttle; a pause of a second or
         * more is idle time, not a step. */
        uint64_t now = moe_now_ns();
        double dt = (double)(now - mod->last_observe) / 1e9;

        if (mod->last_observe && dt < 1.0)
            mod->step_s = mod->step_s > 0 ? 0.8 * mod->step_s + 0.2 * dt : dt;
        mod->last_observe = now;
    }
    if (next && (idx + 1 >= mod->n_moe || !rows_ok(next, n_tokens, K, E)))
        next = NULL;
    /* Learn: the previous batch was this one at the previous MoE layer. */
    if (idx >= 1 && mod->prev_idx == idx - 1 && mod->prev_n == n_tokens) {
        float *C = mod->cooc + (size_t)(idx - 1) * E * E;
        float *R = mod->rows + (size_t)(idx - 1) * E;

        for (int t = 0; t < n_tokens; t++) {
            const int32_t *now = ids + (size_t)t * K;

            for (int j = 0; j < K; j++) {
                int e = mod->prev_ids[(size_t)t * K + j];

                R[e] += 1.0f;
                for (int j2 = 0; j2 < K; j2++)
                    C[(size_t)e * E + now[j2]] += 1.0f;
            }
            /* how often the lookahead named the experts then used */
            if (mod->prev_has_next) {
                for (int j = 0; j < K; j++)
                    for (int j2 = 0; j2 < K; j2++)
                        mod->la_hits += mod->prev_next[(size_t)t * K + j] == now[j2];
                mod->la_total += K;
            }
        }
    }
    if (!grow_ids(&mod->prev_ids, &mod->prev_cap, n) ||
        (next && !grow_ids(&mod->prev_next, &mod->prev_next_cap, n))) {
        mod->prev_idx = -1;
        goto out;
    }
    memcpy(mod->prev_ids, ids, n * sizeof(*ids));
    if (next)
        memcpy(mod->prev_next, next, n * sizeof(*next));
    mod->prev_has_next = next != NULL;
    mod->prev_n = n_tokens;
    mod->prev_idx = idx;
    /* Forecast the next MoE layer, and prefetch it. */
    mod->pred_idx = -1;
    if (mod->cooc && idx + 1 < mod->n_moe && (c->cfg.prefetch || uses_forecast(c->cfg.policy))) {
        predict(mod, idx, ids, next, n_tokens, K);
        if (c->cfg.prefetch && mod->pred_idx >= 0)
            prefetch(c, mod);
    }
out:
    pthread_mutex_unlock(&c->lock);
}

/* ---- operator calls ------------------------------------------------------------------------- */

static int check_expert(struct moe_cache *c, int model, int layer, int expert, struct centry **ret,
                        struct moe_error *err)
{
    struct cmodel *mod = NULL;
    int r = check_layer(c, model, layer, &mod, err);

    if (r < 0)
        return r;
    if (expert < 0 || expert >= mod->n_experts)
        return moe_error_set(err, -EINVAL, "%s layer %d: expert %d out of range: 0 to %d",
                             mod->name, layer, expert, mod->n_experts - 1);
    *ret = get_entry(mod, layer, expert);
    return 0;
}

int moe_cache_pin(struct moe_cache *c, int model, int layer, int expert, struct moe_error *err)
{
    struct centry *e = NULL;
    int r;

    pthread_mutex_lock(&c->lock);
    r = check_expert(c, model, layer, expert, &e, err);
    if (r < 0)
        goto out;
    if (e->bad) {
        r = moe_error_set(err, e->bad_code, "%s (retry it first)", e->bad_msg);
        goto out;
    }
    e->op_pinned = true;
    while (e->t[0].state == SLOT_ABSENT) {
        r = start_load(c, e, -1.0, true, err);
        if (r == -EAGAIN)
            continue;
        if (r == -ENOSPC)
            moe_error_set(err, r,
                          "layer %d expert %d: no room in the %s tier to pin it: every "
                          "expert there is in use or pinned",
                          layer, expert, c->tiers[0].t->name);
        if (r < 0) {
            e->op_pinned = false;
            goto out;
        }
        break;
    }
    while (e->loading)
        pthread_cond_wait(&c->cv, &c->lock);
    if (e->t[0].state != SLOT_RESIDENT) {
        e->op_pinned = false;
        r = moe_error_set(err, e->bad ? e->bad_code : -EIO, "%s",
                          e->bad_msg ? e->bad_msg : "page-in failed");
        goto out;
    }
    r = 0;
out:
    pthread_mutex_unlock(&c->lock);
    return r;
}

int moe_cache_unpin(struct moe_cache *c, int model, int layer, int expert, struct moe_error *err)
{
    struct centry *e = NULL;
    int r;

    pthread_mutex_lock(&c->lock);
    r = check_expert(c, model, layer, expert, &e, err);
    if (r == 0)
        e->op_pinned = false;
    pthread_mutex_unlock(&c->lock);
    return r;
}

int moe_cache_evict(struct moe_cache *c, int model, int layer, int expert, struct moe_error *err)
{
    struct centry *e = NULL;
    int r;

    pthread_mutex_lock(&c->lock);
    r = check_expert(c, model, layer, expert, &e, err);
    if (r < 0)
        goto out;
    if (e->op_pinned) {
        r = moe_error_set(err, -EBUSY,
                          "layer %d expert %d is pinned by an operator: unpin it first", layer,
                          expert);
        goto out;
    }
    if (e->refs || e->holds || e->loading) {
        r = moe_error_set(err, -EBUSY, "layer %d expert %d is %s: try again when it is idle", layer,
                          expert, e->loading ? "paging in" : "in use by a batch");
        goto out;
    }
    for (int k = 0; k < c->n_tiers; k++)
        if (e->t[k].state == SLOT_RESIDENT)
            drop(c, e, k, true);
out:
    pthread_mutex_unlock(&c->lock);
    return r;
}

bool moe_cache_resident(struct moe_cache *c, int model, int layer, int expert)
{
    struct centry *e = NULL;
    bool r = false;

    pthread_mutex_lock(&c->lock);
    if (check_expert(c, model, layer, expert, &e, NULL) == 0)
        for (int k = 0; k < c->n_tiers; k++)
            r |= e->t[k].state == SLOT_RESIDENT;
    pthread_mutex_unlock(&c->lock);
    return r;
}

int moe_cache_retry(struct moe_cache *c, int model, int layer, int expert, struct moe_error *err)
{
    struct cmodel *mod;
    int cleared = 0;

    pthread_mutex_lock(&c->lock);
    mod = get_model(c, model);
    if (!mod) {
        pthread_mutex_unlock(&c->lock);
        return moe_error_set(err, -ENOENT, "no model %d in the cache", model);
    }
    if (layer >= mod->n_layers || expert >= mod->n_experts || layer < -1 || expert < -1) {
        pthread_mutex_unlock(&c->lock);
        return moe_error_set(err, -EINVAL, "%s: no layer %d expert %d", mod->name, layer, expert);
    }
    /* The operator says the files are whole again: their identity now is
     * the one to check.  The checksums stay, so bytes not put back as they
     * were first read still fail. */
    for (int i = 0; i < mod->n_pager_files; i++) {
        int r = moe_pager_refresh_file(c->pager, mod->pager_file[i]);

        if (r < 0 && r != -ENOENT)
            moe_log(MOE_LOG_WARN, "cache: retry: %s: %s, ignoring", mod->m->files[i].path,
                    strerror(-r));
    }
    for (int l = 0; l < mod->n_layers; l++) {
        if ((layer >= 0 && l != layer) || mod->moe_idx[l] < 0)
            continue;
        for (int x = 0; x < mod->n_experts; x++) {
            struct centry *e = get_entry(mod, l, x);

            if ((expert >= 0 && x != expert) || !e->bad)
                continue;
            clear_bad(e);
            e->retry_ms = 0;
            cleared++;
        }
    }
    pthread_mutex_unlock(&c->lock);
    return cleared;
}

int moe_cache_set_capacity(struct moe_cache *c, int tier, uint64_t bytes, struct moe_error *err)
{
    struct tier_state *ts;
    struct evict_ctx x = {c, tier};
    int r;

    pthread_mutex_lock(&c->lock);
    if (tier < 0 || tier >= c->n_tiers) {
        pthread_mutex_unlock(&c->lock);
        return moe_error_set(err, -EINVAL, "no tier %d: the cache has %d", tier, c->n_tiers);
    }
    ts = &c->tiers[tier];
    if (bytes == 0) {
        pthread_mutex_unlock(&c->lock);
        return moe_error_set(err, -EINVAL, "tier %s: a capacity of 0 bytes holds no expert",
                             ts->t->name);
    }
    r = ts->t->ops->resize(ts->t, bytes);
    if (r < 0) {
        pthread_mutex_unlock(&c->lock);
        return moe_error_set(err, r, "tier %s: cannot change the capacity to %" PRIu64 " bytes%s",
                             ts->t->name, bytes,
                             r == -ENOSPC ? ": more than the machine's memory at start" : "");
    }
    while (ts->used > ts->t->capacity) {
        struct moe_pnode *v = ts->policy.ops->victim(&ts->policy, evictable, &x);

        if (!v) {
            r = moe_error_set(err, -EBUSY,
                              "tier %s: %" PRIu64 " bytes are in use or pinned, more than the "
                              "new capacity; the rest is evicted as it is released",
                              ts->t->name, ts->used);
            break;
        }
        drop(c, get_entry(c->models[v->model], v->layer, v->expert), tier, true);
    }
    pthread_mutex_unlock(&c->lock);
    return r;
}

/* ---- statistics ----------------------------------------------------------------------------- */

static void load_counters(const struct counters *a, struct moe_cache_counters *r)
{
    r->hits = atomic_load_explicit(&a->hits, memory_order_relaxed);
    r->misses = atomic_load_explicit(&a->misses, memory_order_relaxed);
    r->prefetch_hits = atomic_load_explicit(&a->prefetch_hits, memory_order_relaxed);
    r->prefetches = atomic_load_explicit(&a->prefetches, memory_order_relaxed);
    r->wasted_prefetches = atomic_load_explicit(&a->wasted_prefetches, memory_order_relaxed);
    r->evictions = atomic_load_explicit(&a->evictions, memory_order_relaxed);
    r->page_ins = atomic_load_explicit(&a->page_ins, memory_order_relaxed);
    r->page_in_errors = atomic_load_explicit(&a->page_in_errors, memory_order_relaxed);
    r->bytes_paged = atomic_load_explicit(&a->bytes_paged, memory_order_relaxed);
    r->prefetched_bytes = atomic_load_explicit(&a->prefetched_bytes, memory_order_relaxed);
    r->wasted_bytes = atomic_load_explicit(&a->wasted_bytes, memory_order_relaxed);
    r->warm_loads = atomic_load_explicit(&a->warm_loads, memory_order_relaxed);
    r->warm_hits = atomic_load_explicit(&a->warm_hits, memory_order_relaxed);
}

/* The value below which a share q of the samples lie, from the buckets:
 * linear within the bucket [2^i, 2^(i+1)). */
static uint64_t percentile(const struct moe_latency *l, double q)
{
    uint64_t want, seen = 0;

    if (l->count == 0)
        return 0;
    want = (uint64_t)ceil(q * (double)l->count);
    for (int i = 0; i < MOE_HIST_BUCKETS; i++) {
        if (seen + l->buckets[i] >= want && l->buckets[i]) {
            double lo = i ? exp2(i) : 0, hi = exp2(i + 1);
            double f = (double)(want - seen) / (double)l->buckets[i];
            uint64_t v = (uint64_t)(lo + f * (hi - lo));

            return MOE_MIN(v, l->max_ns);
        }
        seen += l->buckets[i];
    }
    return l->max_ns;
}

int moe_cache_snapshot(struct moe_cache *c, struct moe_cache_stats *ret)
{
    memset(ret, 0, sizeof(*ret));
    ret->policy = moe_cache_policy_name(c->cfg.policy);
    ret->prefetch = c->cfg.prefetch;
    load_counters(&c->total, &ret->total);
    pthread_mutex_lock(&c->lock);
    ret->n_tiers = c->n_tiers;
    for (int k = 0; k < c->n_tiers; k++) {
        struct tier_state *ts = &c->tiers[k];
        struct moe_cache_tier_stats *t = &ret->tiers[k];

        snprintf(t->name, sizeof(t->name), "%s", ts->t->name);
        t->capacity = ts->t->capacity;
        t->used = ts->used;
        t->resident = ts->resident;
        load_counters(&ts->ctr, &t->c);
        t->latency.count = atomic_load_explicit(&ts->lat_count, memory_order_relaxed);
        t->latency.sum_ns = atomic_load_explicit(&ts->lat_sum, memory_order_relaxed);
        t->latency.max_ns = atomic_load_explicit(&ts->lat_max, memory_order_relaxed);
        for (int b = 0; b < MOE_HIST_BUCKETS; b++)
            t->latency.buckets[b] = atomic_load_explicit(&ts->hist[b], memory_order_relaxed);
        t->latency.p50_ns = percentile(&t->latency, 0.50);
        t->latency.p99_ns = percentile(&t->latency, 0.99);
    }
    ret->models = calloc((size_t)MOE_MAX(1, c->n_models), sizeof(*ret->models));
    if (!ret->models) {
        pthread_mutex_unlock(&c->lock);
        return -ENOMEM;
    }
    for (int i = 0; i < c->n_models; i++) {
        struct cmodel *mod = c->models[i];
        struct moe_cache_model_stats *ms = &ret->models[ret->n_models];
        size_t n;

        if (!mod)
            continue;
        n = (size_t)mod->n_layers * mod->n_experts;
        snprintf(ms->name, sizeof(ms->name), "%s", mod->name);
        ms->id = mod->id;
        ms->n_layers = mod->n_layers;
        ms->n_experts = mod->n_experts;
        ms->expert_bytes = mod->expert_bytes;
        ms->bad_experts = atomic_load_explicit(&mod->bad_experts, memory_order_relaxed);
        ms->experts = calloc(n, sizeof(*ms->experts));
        if (!ms->experts) {
            pthread_mutex_unlock(&c->lock);
            moe_cache_stats_clear(ret);
            return -ENOMEM;
        }
        ret->n_models++;
        for (size_t j = 0; j < n; j++) {
            struct centry *e = &mod->entries[j];
            struct moe_cache_expert_stats *x = &ms->experts[j];

            x->tier = -1;
            if (!e->t)
                continue;
            load_counters(&e->ctr, &x->c);
            for (int k = c->n_tiers - 1; k >= 0; k--)
                if (e->t[k].state == SLOT_RESIDENT)
                    x->tier = (int8_t)k;
            x->loading = e->loading;
            x->bad = e->bad;
            x->operator_pinned = e->op_pinned;
            x->refs = e->refs;
        }
    }
    pthread_mutex_unlock(&c->lock);
    return 0;
}

void moe_cache_stats_clear(struct moe_cache_stats *s)
{
    for (int i = 0; i < s->n_models; i++)
        free(s->models[i].experts);
    free(s->models);
    memset(s, 0, sizeof(*s));
}

double moe_cache_prefetch_precision(const struct moe_cache_counters *c)
{
    uint64_t n = c->prefetch_hits + c->wasted_prefetches;

    return n ? (double)c->prefetch_hits / (double)n : -1.0;
}

/* ---- warm start ----------------------------------------------------------------------------- */

int moe_cache_heat(struct moe_cache *c, int model, double *heat, struct moe_error *err)
{
    struct cmodel *mod;

    pthread_mutex_lock(&c->lock);
    mod = get_model(c, model);
    if (!mod) {
        pthread_mutex_unlock(&c->lock);
        return moe_error_set(err, -ENOENT, "no model %d in the cache", model);
    }
    for (int l = 0; l < mod->n_layers; l++)
        for (int x = 0; x < mod->n_experts; x++) {
            struct centry *e = get_entry(mod, l, x);
            uint64_t uses = atomic_load_explicit(&e->ctr.hits, memory_order_relaxed) +
                            atomic_load_explicit(&e->ctr.misses, memory_order_relaxed);

            heat[(size_t)l * mod->n_experts + x] =
                mod->moe_idx[l] < 0 ? 0.0 : (double)uses + 0.5 * (double)e->heat_prev;
        }
    pthread_mutex_unlock(&c->lock);
    return 0;
}

struct warm_pick {
    double heat;
    int layer, expert;
};

static int by_heat_desc(const void *a, const void *b)
{
    const struct warm_pick *x = a, *y = b;

    if (x->heat != y->heat)
        return x->heat > y->heat ? -1 : 1;
    if (x->layer != y->layer)
        return x->layer - y->layer;
    return x->expert - y->expert;
}

int moe_cache_warm(struct moe_cache *c, int model, const double *heat, double share,
                   struct moe_error *err)
{
    struct cmodel *mod;
    struct warm_pick *picks;
    size_t n = 0, total;
    int started = 0;

    if (!(share > 0.0 && share <= 1.0))
        return moe_error_set(err, -EINVAL, "warm start: share %g is not in (0, 1]", share);
    pthread_mutex_lock(&c->lock);
    mod = get_model(c, model);
    if (!mod) {
        pthread_mutex_unlock(&c->lock);
        return moe_error_set(err, -ENOENT, "no model %d in the cache", model);
    }
    total = (size_t)mod->n_layers * (size_t)mod->n_experts;
    picks = malloc(total * sizeof(*picks));
    if (!picks) {
        pthread_mutex_unlock(&c->lock);
        return moe_error_set(err, -ENOMEM, "warm start: out of memory");
    }
    for (int l = 0; l < mod->n_layers; l++)
        for (int x = 0; x < mod->n_experts; x++) {
            double h = heat[(size_t)l * mod->n_experts + x];
            struct centry *e = get_entry(mod, l, x);

            if (mod->moe_idx[l] < 0 || !(h > 0.0) || !isfinite(h))
                continue;
            e->heat_prev = (float)h;
            picks[n++] = (struct warm_pick){h, l, x};
        }
    qsort(picks, n, sizeof(*picks), by_heat_desc);
    /* Hottest first, into the room the tiers have free (up to share of each
     * tier's capacity): a warm start evicts nothing.  An expert that does
     * not fit is skipped; a smaller, colder one may still fit. */
    for (size_t i = 0; i < n; i++) {
        struct centry *e = get_entry(mod, picks[i].layer, picks[i].expert);
        bool fits = true;

        if (e->bad || e->loading || e->t[0].state != SLOT_ABSENT)
            continue;
        for (int k = 0; k < c->n_tiers && fits; k++) {
            const struct tier_state *ts = &c->tiers[k];

            if (e->t[k].state == SLOT_ABSENT &&
                (double)(ts->used + e->bytes) > share * (double)ts->t->capacity)
                fits = false;
        }
        if (!fits)
            continue;
        if (start_load(c, e, 1.0, false, NULL) < 0 || e->bad)
            continue;
        e->warm = true;
        started++;
        inc(&c->tiers[0].ctr.warm_loads, 1);
        inc(&e->ctr.warm_loads, 1);
        inc(&c->total.warm_loads, 1);
    }
    pthread_mutex_unlock(&c->lock);
    free(picks);
    return started;
}

double moe_cache_hit_rate(const struct moe_cache_counters *c)
{
    uint64_t n = c->hits + c->misses;

    return n ? (double)c->hits / (double)n : 0.0;
}

bool moe_cache_wants_lookahead(struct moe_cache *c)
{
    return c->cfg.prefetch || uses_forecast(c->cfg.policy);
}

int moe_cache_tier_count(struct moe_cache *c)
{
    return c->n_tiers;
}

bool moe_cache_tier0_host(struct moe_cache *c)
{
    /* No lock: tiers are pushed only before the first model is added
     * (under the lock), so once there is anything to compute, tier 0 is
     * fixed.  Called for every run of a forward. */
    return c->tiers[0].t->host_memory;
}

int moe_cache_set_policy(struct moe_cache *c, enum moe_cache_policy policy, bool prefetch,
                         struct moe_error *err)
{
    if ((unsigned)policy >= MOE_POLICY_COUNT)
        return moe_error_set(err, -EINVAL, "unknown cache policy %d", (int)policy);
    pthread_mutex_lock(&c->lock);
    for (int k = 0; k < c->n_tiers; k++) {
        struct moe_policy np;

        if (moe_policy_init(&np, policy, &c->env) < 0) {
            pthread_mutex_unlock(&c->lock);
            return moe_error_set(err, -ENOMEM, "out of memory");
        }
        moe_policy_clear(&c->tiers[k].policy);
        c->tiers[k].policy = np;
        /* the list head moved with the struct */
        c->tiers[k].policy.lru.next = c->tiers[k].policy.lru.prev = &c->tiers[k].policy.lru;
    }
    /* Every resident expert enters the new policies; use counts carry over. */
    for (int i = 0; i < c->n_models; i++) {
        struct cmodel *mod = c->models[i];

        if (!mod)
            continue;
        for (size_t j = 0; j < (size_t)mod->n_layers * mod->n_experts; j++) {
            struct centry *e = &mod->entries[j];

            if (!e->t)
                continue;
            for (int k = 0; k < c->n_tiers; k++) {
                struct moe_pnode *n = &e->t[k].node;

                n->prev = n->next = NULL;
                n->heap = -1;
                moe_pnode_reset_ghosts(n);
                if (n->resident)
                    c->tiers[k].policy.ops->insert(&c->tiers[k].policy, n);
            }
        }
    }
    c->cfg.policy = policy;
    c->cfg.prefetch = prefetch;
    pthread_mutex_unlock(&c->lock);
    return 0;
}
