/*
 * The gRPC handlers: moe.v1.Experts (Forward, ForwardStream), moe.v1.Control
 * and grpc.health.v1.Health/Check.  Each decodes its protobuf-c message,
 * checks it against the loaded models (a bad request gets INVALID_ARGUMENT
 * or NOT_FOUND with what is wrong, and nothing else is disturbed), and
 * answers.  Forwards go through the scheduler and answer from its worker
 * thread when their batch is done.
 */
#include "moed.h"

#include "dtype.h"
#include "forward.h"
#include "health.pb-c.h"
#include "log.h"
#include "moe.pb-c.h"

#include <errno.h>
#include <grpc/status.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- Experts.Forward ------------------------------------------------------------------- */

/* A Forward call: the request (forward.h) and its envelope. */
struct fwd {
    struct moed_fwd f;
    struct moe_rpc_call *call;
    Moe__V1__ForwardRequest *q; /* decoded; f's input may point into it */
};

static void fwd_free(struct fwd *g)
{
    moed_fwd_release(&g->f);
    moe__v1__forward_request__free_unpacked(g->q, NULL);
    free(g);
}

static void fwd_done(struct moed_fwd *f, int status, const char *msg)
{
    struct fwd *g = (struct fwd *)f; /* f is its first member */
    const struct moe_sched_req *r = &f->sr;
    Moe__V1__ForwardResponse resp = MOE__V1__FORWARD_RESPONSE__INIT;
    Moe__V1__Tensor out = MOE__V1__TENSOR__INIT;
    Moe__V1__Routing rt = MOE__V1__ROUTING__INIT;
    Moe__V1__Timing tm = MOE__V1__TIMING__INIT;
    int64_t shape[2] = {f->n_tokens, f->hidden};

    if (status < 0) {
        moe_rpc_fail(g->call, moed_grpc_status(status), "%s", msg);
        goto out;
    }
    out.n_shape = 2;
    out.shape = shape;
    out.dtype = f->dtype;
    /* In the request's dtype, in place: packed from there, no other copy. */
    out.data.len = moed_fwd_encode_in_place(f);
    out.data.data = (uint8_t *)f->out;
    resp.output = &out;
    if (f->ret_ids) {
        rt.top_k = (uint32_t)f->top_k;
        rt.n_expert_ids = (size_t)f->n_tokens * f->top_k;
        rt.expert_ids = f->ret_ids;
        rt.n_weights = (size_t)f->n_tokens * f->top_k;
        rt.weights = f->ret_weights;
        resp.routing = &rt;
    }
    tm.queue_ns = r->queue_ns;
    tm.route_ns = r->st.route_ns;
    tm.load_ns = r->st.load_ns;
    tm.compute_ns = r->st.compute_ns;
    tm.total_ns = moe_now_ns() - f->t_recv;
    tm.batch_requests = (uint32_t)r->batch_requests;
    tm.batch_tokens = (uint32_t)r->batch_tokens;
    resp.timing = &tm;
    resp.cache_hits = (uint32_t)r->st.hits;
    resp.cache_misses = (uint32_t)r->st.misses;
    resp.tag = g->q->tag;
    moed_reply_msg(g->call, &resp.base);
out:
    fwd_free(g);
}

static void on_forward(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    struct moed *d = arg;
    Moe__V1__ForwardRequest *q = moe__v1__forward_request__unpack(NULL, len, req);
    struct fwd *g = calloc(1, sizeof(*g));
    char msg[MOE_ERROR_MSG_MAX + 64];
    uint64_t t_recv = moe_now_ns();
    int r;

    if (!q || !g) {
        int st = q ? GRPC_STATUS_RESOURCE_EXHAUSTED : GRPC_STATUS_INVALID_ARGUMENT;

        moed_metrics_request(d->metrics, NULL, -1, MOED_TRANSPORT_GRPC, st, 0,
                             moe_now_ns() - t_recv);
        moe_rpc_fail(call, st, "%s",
                     q ? "out of memory" : "the request is not a moe.v1.ForwardRequest");
        moe__v1__forward_request__free_unpacked(q, NULL);
        free(g);
        return;
    }
    moed_fwd_init(&g->f, d, MOED_TRANSPORT_GRPC);
    g->f.t_recv = t_recv;
    g->f.layer = q->layer > INT32_MAX ? -1 : (int)q->layer; /* for the metrics until checked */
    g->call = call;
    g->q = q;
    /* Stopping (SIGTERM): the gRPC core starts no new call, so what comes
     * here is a message of a stream open at the signal: it is answered, as
     * the requests in flight are, until drain_timeout_ms cuts the stream. */
    if (atomic_load(&d->state) == MOED_DRAINING) {
        moed_fwd_count(&g->f, GRPC_STATUS_UNAVAILABLE);
        moe_rpc_fail(call, GRPC_STATUS_UNAVAILABLE, "moed is draining: no new requests");
        goto fail;
    }
    /* Failed (a lost device): nothing can be computed; moed is exiting. */
    if (atomic_load(&d->state) == MOED_FAILED) {
        moed_fwd_count(&g->f, GRPC_STATUS_UNAVAILABLE);
        moe_rpc_fail(call, GRPC_STATUS_UNAVAILABLE,
                     "moed failed: %s; it takes no requests and exits to be restarted",
                     moed_fatal_reason(d));
        goto fail;
    }
    r = moed_fwd_model_by_name(&g->f, q->model, msg, sizeof(msg));
    if (r == 0)
        r = moed_fwd_decode_grpc(&g->f, q, g->f.mm->m, msg, sizeof(msg));
    if (r == 0)
        r = moed_fwd_submit(&g->f, 0, q->return_routing, fwd_done, NULL, msg, sizeof(msg));
    if (r < 0) {
        moed_fwd_count(&g->f, moed_grpc_status(r));
        moe_rpc_fail(call, moed_grpc_status(r), "%s", msg);
        goto fail;
    }
    return; /* fwd_done answers */
fail:
    fwd_free(g);
}

/* ---- Control --------------------------------------------------------------------------- */

const char *moed_state_name(int s)
{
    return s == MOED_SERVING    ? "serving"
           : s == MOED_DRAINING ? "draining"
           : s == MOED_FAILED   ? "failed"
                                : "stopping";
}

static void on_status(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    struct moed *d = arg;
    Moe__V1__StatusResponse r = MOE__V1__STATUS_RESPONSE__INIT;

    (void)req, (void)len;
    r.version = (char *)MOED_VERSION;
    r.uptime_ns = moe_now_ns() - d->t_start;
    r.state = (char *)moed_state_name(atomic_load(&d->state));
    pthread_mutex_lock(&d->lock);
    r.models = (uint32_t)d->n_models;
    r.policy = (char *)moe_cache_policy_name(d->cfg.policy); /* SIGHUP sets them under lock */
    r.prefetch = d->cfg.prefetch;
    pthread_mutex_unlock(&d->lock);
    r.requests = atomic_load(&d->requests);
    r.tokens = atomic_load(&d->tokens);
    r.in_flight = (uint32_t)atomic_load(&d->in_flight);
    r.node = (char *)moed_cluster_node(d);
    moed_cluster_peers(d, &r.peers, &r.n_peers);
    moed_reply_msg(call, &r.base);
    moed_cluster_free_peers(r.peers, r.n_peers);
}

static Moe__V1__DType proto_dtype(enum moe_dtype t)
{
    return t == MOE_DTYPE_F32    ? MOE__V1__DTYPE__DTYPE_F32
           : t == MOE_DTYPE_BF16 ? MOE__V1__DTYPE__DTYPE_BF16
           : t == MOE_DTYPE_F16  ? MOE__V1__DTYPE__DTYPE_F16
                                 : MOE__V1__DTYPE__DTYPE_UNSPECIFIED;
}

/* Fills info for mm (ids: room for the MoE layer ids). */
static void model_info(const struct moed_model *mm, Moe__V1__ModelInfo *mi, uint32_t *ids)
{
    const struct moe_model *m = mm->m;

    moe__v1__model_info__init(mi);
    mi->name = mm->name;
    mi->dir = m->dir;
    mi->arch = (char *)moe_arch_name(m->cfg.arch);
    mi->layers = (uint32_t)m->cfg.n_layers;
    mi->moe_layers = (uint32_t)m->n_moe_layers;
    mi->hidden = (uint32_t)m->cfg.hidden;
    mi->experts = (uint32_t)m->cfg.n_experts;
    mi->top_k = (uint32_t)m->cfg.top_k;
    mi->shared_experts = (uint32_t)m->cfg.n_shared_experts;
    mi->dtype = proto_dtype(m->expert_dtype);
    mi->expert_bytes = m->expert_bytes;
    mi->packed = m->packed;
    mi->n_moe_layer_ids = 0;
    mi->moe_layer_ids = ids;
    for (int l = 0; l < m->cfg.n_layers; l++)
        if (m->layers[l].is_moe)
            ids[mi->n_moe_layer_ids++] = (uint32_t)l;
}

static void on_list_models(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    struct moed *d = arg;
    Moe__V1__ListModelsResponse r = MOE__V1__LIST_MODELS_RESPONSE__INIT;
    Moe__V1__ModelInfo infos[MOED_MAX_MODELS], *ptrs[MOED_MAX_MODELS];
    uint32_t *ids[MOED_MAX_MODELS] = {0};

    (void)req, (void)len;
    pthread_mutex_lock(&d->lock);
    for (int i = 0; i < d->n_models; i++) {
        ids[i] = calloc((size_t)d->models[i]->m->cfg.n_layers, sizeof(uint32_t));
        if (!ids[i])
            continue;
        model_info(d->models[i], &infos[r.n_models], ids[i]);
        ptrs[r.n_models] = &infos[r.n_models];
        r.n_models++;
    }
    r.models = ptrs;
    moed_reply_msg(call, &r.base);
    pthread_mutex_unlock(&d->lock);
    for (int i = 0; i < MOED_MAX_MODELS; i++)
        free(ids[i]);
}

static void counters(const struct moe_cache_counters *c, Moe__V1__CacheCounters *p)
{
    moe__v1__cache_counters__init(p);
    p->hits = c->hits;
    p->misses = c->misses;
    p->prefetch_hits = c->prefetch_hits;
    p->prefetches = c->prefetches;
    p->wasted_prefetches = c->wasted_prefetches;
    p->evictions = c->evictions;
    p->page_ins = c->page_ins;
    p->page_in_errors = c->page_in_errors;
    p->bytes_paged = c->bytes_paged;
    p->prefetched_bytes = c->prefetched_bytes;
    p->wasted_bytes = c->wasted_bytes;
    p->warm_loads = c->warm_loads;
    p->warm_hits = c->warm_hits;
}

static void add_counters(struct moe_cache_counters *a, const struct moe_cache_counters *b)
{
    a->hits += b->hits;
    a->misses += b->misses;
    a->prefetch_hits += b->prefetch_hits;
    a->prefetches += b->prefetches;
    a->wasted_prefetches += b->wasted_prefetches;
    a->evictions += b->evictions;
    a->page_ins += b->page_ins;
    a->page_in_errors += b->page_in_errors;
    a->bytes_paged += b->bytes_paged;
    a->prefetched_bytes += b->prefetched_bytes;
    a->wasted_bytes += b->wasted_bytes;
    a->warm_loads += b->warm_loads;
    a->warm_hits += b->warm_hits;
}

static void on_stats(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    struct moed *d = arg;
    Moe__V1__StatsRequest *q = moe__v1__stats_request__unpack(NULL, len, req);
    Moe__V1__StatsResponse r = MOE__V1__STATS_RESPONSE__INIT;
    Moe__V1__ClusterCounters cc = MOE__V1__CLUSTER_COUNTERS__INIT;
    Moe__V1__TierStats ts[MOE_CACHE_MAX_TIERS], *tsp[MOE_CACHE_MAX_TIERS];
    Moe__V1__CacheCounters tc[MOE_CACHE_MAX_TIERS], total;
    Moe__V1__Latency lat[MOE_CACHE_MAX_TIERS];
    Moe__V1__ModelStats *ms = NULL, **msp = NULL;
    Moe__V1__LayerStats *ls = NULL, **lsp = NULL;
    Moe__V1__ExpertStats *es = NULL, **esp = NULL;
    Moe__V1__CacheCounters *lc = NULL, *ec = NULL;
    struct moe_cache_stats s;
    struct moe_sched_stats ss;
    struct moe_cache_counters *lsum = NULL;
    size_t n_layers = 0, n_experts = 0, li = 0, ei = 0;
    bool want_experts;

    if (!q) {
        moe_rpc_fail(call, GRPC_STATUS_INVALID_ARGUMENT, "the request is not a StatsRequest");
        return;
    }
    want_experts = q->experts;
    moe__v1__stats_request__free_unpacked(q, NULL);
    if (moe_cache_snapshot(d->cache, &s) < 0) {
        moe_rpc_fail(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory for the statistics");
        return;
    }
    moe_sched_get_stats(d->sched, &ss);
    r.policy = (char *)s.policy;
    r.prefetch = s.prefetch;
    for (int k = 0; k < s.n_tiers; k++) {
        moe__v1__tier_stats__init(&ts[k]);
        moe__v1__latency__init(&lat[k]);
        ts[k].name = s.tiers[k].name;
        ts[k].capacity = s.tiers[k].capacity;
        ts[k].used = s.tiers[k].used;
        ts[k].resident = s.tiers[k].resident;
        counters(&s.tiers[k].c, &tc[k]);
        ts[k].counters = &tc[k];
        lat[k].count = s.tiers[k].latency.count;
        lat[k].sum_ns = s.tiers[k].latency.sum_ns;
        lat[k].p50_ns = s.tiers[k].latency.p50_ns;
        lat[k].p99_ns = s.tiers[k].latency.p99_ns;
        lat[k].max_ns = s.tiers[k].latency.max_ns;
        lat[k].n_buckets = MOE_HIST_BUCKETS;
        lat[k].buckets = s.tiers[k].latency.buckets;
        ts[k].page_in = &lat[k];
        tsp[k] = &ts[k];
    }
    r.n_tiers = (size_t)s.n_tiers;
    r.tiers = tsp;
    counters(&s.total, &total);
    r.total = &total;
    for (int i = 0; i < s.n_models; i++) {
        n_layers += (size_t)s.models[i].n_layers;
        n_experts += (size_t)s.models[i].n_layers * (size_t)s.models[i].n_experts;
    }
    ms = calloc((size_t)MOE_MAX(1, s.n_models), sizeof(*ms));
    msp = calloc((size_t)MOE_MAX(1, s.n_models), sizeof(*msp));
    ls = calloc(MOE_MAX(1, n_layers), sizeof(*ls));
    lsp = calloc(MOE_MAX(1, n_layers), sizeof(*lsp));
    lc = calloc(MOE_MAX(1, n_layers), sizeof(*lc));
    lsum = calloc(MOE_MAX(1, n_layers), sizeof(*lsum));
    if (want_experts) {
        es = calloc(MOE_MAX(1, n_experts), sizeof(*es));
        esp = calloc(MOE_MAX(1, n_experts), sizeof(*esp));
        ec = calloc(MOE_MAX(1, n_experts), sizeof(*ec));
    }
    if (!ms || !msp || !ls || !lsp || !lc || !lsum || (want_experts && (!es || !esp || !ec))) {
        moe_rpc_fail(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory for the statistics");
        goto out;
    }
    for (int i = 0; i < s.n_models; i++) {
        const struct moe_cache_model_stats *m = &s.models[i];
        size_t l0 = li, e0 = ei;

        bool is_moe[MOE_MAX_LAYERS];

        /* dense layers have no experts: leave them out */
        for (int l = 0; l < m->n_layers; l++)
            is_moe[l] = true;
        moe__v1__model_stats__init(&ms[i]);
        pthread_mutex_lock(&d->lock);
        for (int k = 0; k < d->n_models; k++) {
            if (d->models[k]->cache_id != m->id)
                continue;
            for (int l = 0; l < m->n_layers; l++)
                is_moe[l] = d->models[k]->m->layers[l].is_moe;
            ms[i].token_rows =
                atomic_load_explicit(&d->models[k]->token_rows, memory_order_relaxed);
        }
        pthread_mutex_unlock(&d->lock);
        ms[i].name = s.models[i].name;
        ms[i].bad_experts = (uint32_t)m->bad_experts;
        for (int l = 0; l < m->n_layers; l++) {
            if (!is_moe[l])
                continue;
            for (int x = 0; x < m->n_experts; x++) {
                const struct moe_cache_expert_stats *xs = &m->experts[(size_t)l * m->n_experts + x];

                add_counters(&lsum[li], &xs->c);
                if (want_experts) {
                    moe__v1__expert_stats__init(&es[ei]);
                    es[ei].layer = (uint32_t)l;
                    es[ei].expert = (uint32_t)x;
                    counters(&xs->c, &ec[ei]);
                    es[ei].counters = &ec[ei];
                    es[ei].tier = xs->tier;
                    es[ei].loading = xs->loading;
                    es[ei].bad = xs->bad;
                    es[ei].operator_pinned = xs->operator_pinned;
                    es[ei].refs = xs->refs;
                    esp[ei] = &es[ei];
                    ei++;
                }
            }
            moe__v1__layer_stats__init(&ls[li]);
            ls[li].layer = (uint32_t)l;
            counters(&lsum[li], &lc[li]);
            ls[li].counters = &lc[li];
            lsp[li] = &ls[li];
            li++;
        }
        ms[i].n_layers = li - l0;
        ms[i].layers = lsp + l0;
        ms[i].n_experts = ei - e0;
        ms[i].experts = want_experts ? esp + e0 : NULL;
        msp[i] = &ms[i];
    }
    r.n_models = (size_t)s.n_models;
    r.models = msp;
    r.requests = ss.requests;
    r.tokens = ss.tokens;
    r.batches = ss.batches;
    r.uptime_ns = moe_now_ns() - d->t_start;
    r.node = (char *)moed_cluster_node(d);
    moed_cluster_peers(d, &r.peers, &r.n_peers);
    moed_cluster_counters(d, &cc);
    r.cluster = &cc;
    moed_reply_msg(call, &r.base);
    moed_cluster_free_peers(r.peers, r.n_peers);
out:
    free(ms);
    free(msp);
    free(ls);
    free(lsp);
    free(lc);
    free(lsum);
    free(es);
    free(esp);
    free(ec);
    moe_cache_stats_clear(&s);
}

/* A LoadModel waiting for the loader thread (loader.c). */
struct load_call {
    struct moe_rpc_call *call;
    char *name, *dir;
};

static void load_call_free(struct load_call *lc)
{
    free(lc->name);
    free(lc->dir);
    free(lc);
}

static void load_run(struct moed *d, void *arg)
{
    struct load_call *lc = arg;
    Moe__V1__LoadModelResponse r = MOE__V1__LOAD_MODEL_RESPONSE__INIT;
    Moe__V1__ModelInfo mi;
    struct moe_error err;
    struct moed_model *mm;
    uint32_t *ids;

    if (moed_load_model(d, lc->name, lc->dir, &err) < 0) {
        moe_log(MOE_LOG_INFO, "LoadModel %s from %s refused: %s", lc->name, lc->dir, err.msg);
        moe_rpc_fail(lc->call, moed_grpc_status(err.code), "%s", err.msg);
        goto out;
    }
    mm = moed_model_get(d, lc->name);
    if (!mm) {
        moe_rpc_fail(lc->call, GRPC_STATUS_ABORTED, "model '%s' was unloaded meanwhile", lc->name);
        goto out;
    }
    ids = calloc((size_t)mm->m->cfg.n_layers, sizeof(*ids));
    if (ids) {
        model_info(mm, &mi, ids);
        r.model = &mi;
        moed_reply_msg(lc->call, &r.base);
        free(ids);
    } else {
        moe_rpc_fail(lc->call, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    }
    moed_model_put(d, mm);
out:
    load_call_free(lc);
}

static void load_cancel(struct moed *d, void *arg)
{
    struct load_call *lc = arg;

    (void)d;
    moe_rpc_fail(lc->call, GRPC_STATUS_UNAVAILABLE, "moed stopped before loading '%s'", lc->name);
    load_call_free(lc);
}

/* Answers when the load ends, from the loader thread: a load reads from disk
 * and must not hold a completion-queue thread. */
static void on_load(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    struct moed *d = arg;
    Moe__V1__LoadModelRequest *q = moe__v1__load_model_request__unpack(NULL, len, req);
    struct load_call *lc = NULL;
    struct moe_error err;

    if (!q || !q->dir || !*q->dir) {
        moe_rpc_fail(call, GRPC_STATUS_INVALID_ARGUMENT,
                     "LoadModel needs dir: a checkpoint or packed store on moed's host");
        goto out;
    }
    lc = calloc(1, sizeof(*lc));
    if (lc) {
        lc->call = call;
        lc->dir = strdup(q->dir);
        if (q->name && *q->name) {
            lc->name = strdup(q->name);
        } else {
            const char *b = strrchr(q->dir, '/');

            lc->name = strdup(b && b[1] ? b + 1 : q->dir);
        }
    }
    if (!lc || !lc->dir || !lc->name) {
        moe_rpc_fail(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        goto out;
    }
    if (strlen(lc->name) > 255)
        lc->name[255] = 0; /* as before: names are cut at 255 bytes */
    if (moed_loader_submit(d, load_run, load_cancel, lc, &err) < 0) {
        moe_rpc_fail(call, err.code == -EAGAIN ? GRPC_STATUS_RESOURCE_EXHAUSTED
                                               : moed_grpc_status(err.code),
                     "%s", err.msg);
        goto out;
    }
    lc = NULL; /* load_run or load_cancel owns it */
out:
    if (lc)
        load_call_free(lc);
    if (q)
        moe__v1__load_model_request__free_unpacked(q, NULL);
}

static void on_unload(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    struct moed *d = arg;
    Moe__V1__UnloadModelRequest *q = moe__v1__unload_model_request__unpack(NULL, len, req);
    Moe__V1__UnloadModelResponse r = MOE__V1__UNLOAD_MODEL_RESPONSE__INIT;
    struct moe_error err;

    if (!q || !q->name || !*q->name)
        moe_rpc_fail(call, GRPC_STATUS_INVALID_ARGUMENT, "UnloadModel needs a model name");
    else if (moed_unload_model(d, q->name, &err) < 0)
        moe_rpc_fail(call, moed_grpc_status(err.code), "%s", err.msg);
    else
        moed_reply_msg(call, &r.base);
    if (q)
        moe__v1__unload_model_request__free_unpacked(q, NULL);
}

enum expert_op { OP_PIN, OP_UNPIN, OP_EVICT };

/* Whether an operator pinned the expert, from a snapshot of the cache: an
 * operator call is rare enough for the copy.  false when out of memory. */
static bool operator_pinned(struct moed *d, int cache_id, int layer, int expert)
{
    struct moe_cache_stats s;
    bool pinned = false;

    if (moe_cache_snapshot(d->cache, &s) < 0)
        return false;
    for (int i = 0; i < s.n_models; i++) {
        const struct moe_cache_model_stats *m = &s.models[i];

        if (m->id == cache_id && layer < m->n_layers && expert < m->n_experts)
            pinned =
                m->experts[(size_t)layer * (size_t)m->n_experts + (size_t)expert].operator_pinned;
    }
    moe_cache_stats_clear(&s);
    return pinned;
}

static void expert_call(struct moe_rpc_call *call, const uint8_t *req, size_t len, struct moed *d,
                        enum expert_op op)
{
    Moe__V1__ExpertRef *q = moe__v1__expert_ref__unpack(NULL, len, req);
    Moe__V1__PinResponse pr = MOE__V1__PIN_RESPONSE__INIT;
    Moe__V1__UnpinResponse ur = MOE__V1__UNPIN_RESPONSE__INIT;
    Moe__V1__EvictResponse er = MOE__V1__EVICT_RESPONSE__INIT;
    struct moed_model *mm;
    struct moe_error err;
    int r;

    if (!q || !q->model) {
        moe_rpc_fail(call, GRPC_STATUS_INVALID_ARGUMENT, "the request is not an ExpertRef");
        goto out;
    }
    mm = moed_model_get(d, q->model);
    if (!mm) {
        moe_rpc_fail(call, GRPC_STATUS_NOT_FOUND, "no model called '%s'", q->model);
        goto out;
    }
    if (q->layer > INT32_MAX || q->expert > INT32_MAX) {
        r = moe_error_set(&err, -EINVAL, "layer %u expert %u out of range", q->layer, q->expert);
    } else if (op == OP_PIN) {
        r = moe_cache_pin(d->cache, mm->cache_id, (int)q->layer, (int)q->expert, &err);
    } else if (op == OP_UNPIN) {
        /* What changed, for the operator: checked before, as the cache
         * does not say (racing operators may each see it pinned). */
        ur.was_pinned = operator_pinned(d, mm->cache_id, (int)q->layer, (int)q->expert);
        r = moe_cache_unpin(d->cache, mm->cache_id, (int)q->layer, (int)q->expert, &err);
    } else {
        er.was_resident = moe_cache_resident(d->cache, mm->cache_id, (int)q->layer, (int)q->expert);
        r = moe_cache_evict(d->cache, mm->cache_id, (int)q->layer, (int)q->expert, &err);
    }
    moed_model_put(d, mm);
    if (r < 0)
        moe_rpc_fail(call, moed_grpc_status(r), "%s", err.msg);
    else
        moed_reply_msg(call, op == OP_PIN ? &pr.base : op == OP_UNPIN ? &ur.base : &er.base);
out:
    if (q)
        moe__v1__expert_ref__free_unpacked(q, NULL);
}

static void on_pin(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    expert_call(call, req, len, arg, OP_PIN);
}

static void on_unpin(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    expert_call(call, req, len, arg, OP_UNPIN);
}

static void on_evict(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    expert_call(call, req, len, arg, OP_EVICT);
}

static void on_retry(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    struct moed *d = arg;
    Moe__V1__RetryRequest *q = moe__v1__retry_request__unpack(NULL, len, req);
    Moe__V1__RetryResponse rr = MOE__V1__RETRY_RESPONSE__INIT;
    struct moed_model *mm;
    struct moe_error err;
    int r;

    if (!q || !q->model) {
        moe_rpc_fail(call, GRPC_STATUS_INVALID_ARGUMENT, "the request is not a RetryRequest");
        goto out;
    }
    mm = moed_model_get(d, q->model);
    if (!mm) {
        moe_rpc_fail(call, GRPC_STATUS_NOT_FOUND, "no model called '%s'", q->model);
        goto out;
    }
    if (q->layer > INT32_MAX || (!q->all && q->expert > INT32_MAX))
        r = moe_error_set(&err, -EINVAL, "layer %u expert %u out of range", q->layer, q->expert);
    else
        r = moe_cache_retry(d->cache, mm->cache_id, (int)q->layer, q->all ? -1 : (int)q->expert,
                            &err);
    moed_model_put(d, mm);
    if (r < 0) {
        moe_rpc_fail(call, moed_grpc_status(r), "%s", err.msg);
        goto out;
    }
    moe_log(MOE_LOG_INFO, "retry: %d bad expert%s of layer %u of %s cleared", r, r == 1 ? "" : "s",
            q->layer, q->model);
    rr.cleared = (uint32_t)r;
    moed_reply_msg(call, &rr.base);
out:
    if (q)
        moe__v1__retry_request__free_unpacked(q, NULL);
}

static void on_drain(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    struct moed *d = arg;
    Moe__V1__DrainRequest *q = moe__v1__drain_request__unpack(NULL, len, req);
    Moe__V1__DrainResponse r = MOE__V1__DRAIN_RESPONSE__INIT;
    int n;

    if (!q) {
        moe_rpc_fail(call, GRPC_STATUS_INVALID_ARGUMENT, "the request is not a DrainRequest");
        return;
    }
    if (q->resume) {
        int st = MOED_DRAINING;

        atomic_compare_exchange_strong(&d->state, &st, MOED_SERVING);
        moe_log(MOE_LOG_INFO, "serving again after a drain");
        moed_reply_msg(call, &r.base);
        moe__v1__drain_request__free_unpacked(q, NULL);
        return;
    }
    {
        int st = MOED_SERVING;

        if (atomic_compare_exchange_strong(&d->state, &st, MOED_DRAINING))
            moe_log(MOE_LOG_INFO, "draining: new forwards get UNAVAILABLE");
    }
    /* Waits on a completion-queue thread: bounded, and the scheduler's own
     * workers finish the batches. */
    /* Split forwards first: they still submit their local share. */
    n = moed_cluster_drain(d, q->timeout_ms ? q->timeout_ms : 30000);
    if (n == 0)
        n = moe_sched_drain(d->sched, q->timeout_ms ? q->timeout_ms : 30000);
    if (n < 0) {
        moe_rpc_fail(call, GRPC_STATUS_DEADLINE_EXCEEDED, "requests still in flight after %llu ms",
                     (unsigned long long)(q->timeout_ms ? q->timeout_ms : 30000));
    } else {
        r.finished = (uint32_t)n;
        moed_reply_msg(call, &r.base);
    }
    moe__v1__drain_request__free_unpacked(q, NULL);
}

/* ---- Health ---------------------------------------------------------------------------- */

static void on_health(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    struct moed *d = arg;
    Grpc__Health__V1__HealthCheckRequest *q =
        grpc__health__v1__health_check_request__unpack(NULL, len, req);
    Grpc__Health__V1__HealthCheckResponse r = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    const char *svc;

    if (!q) {
        moe_rpc_fail(call, GRPC_STATUS_INVALID_ARGUMENT, "the request is not a HealthCheckRequest");
        return;
    }
    svc = q->service ? q->service : "";
    if (*svc && strcmp(svc, "moe.v1.Experts") != 0 && strcmp(svc, "moe.v1.Control") != 0) {
        moe_rpc_fail(call, GRPC_STATUS_NOT_FOUND, "unknown service '%s'", svc);
    } else {
        /* Draining, stopping and failed (a lost device) alike. */
        r.status = atomic_load(&d->state) == MOED_SERVING
                       ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
                       : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
        moed_reply_msg(call, &r.base);
    }
    grpc__health__v1__health_check_request__free_unpacked(q, NULL);
}

int moed_methods(struct moed *d, const struct moe_rpc_method **ret)
{
    static struct moe_rpc_method m[] = {
        {"/moe.v1.Experts/Forward", false, false, on_forward, NULL},
        {"/moe.v1.Experts/ForwardStream", true, false, on_forward, NULL},
        {"/moe.v1.Control/Status", false, false, on_status, NULL},
        {"/moe.v1.Control/Stats", false, false, on_stats, NULL},
        {"/moe.v1.Control/ListModels", false, false, on_list_models, NULL},
        {"/moe.v1.Control/LoadModel", false, true, on_load, NULL},
        {"/moe.v1.Control/UnloadModel", false, true, on_unload, NULL},
        {"/moe.v1.Control/Pin", false, true, on_pin, NULL},
        {"/moe.v1.Control/Unpin", false, true, on_unpin, NULL},
        {"/moe.v1.Control/Evict", false, true, on_evict, NULL},
        {"/moe.v1.Control/Retry", false, true, on_retry, NULL},
        {"/moe.v1.Control/RecordRouting", false, true, moed_on_record_routing, NULL},
        {"/moe.v1.Control/Drain", false, true, on_drain, NULL},
        {"/moe.v1.Control/Placement", false, false, moed_on_placement, NULL},
        {"/moe.v1.Control/AddPeer", false, true, moed_on_add_peer, NULL},
        {"/moe.v1.Control/RemovePeer", false, true, moed_on_remove_peer, NULL},
        /* Between nodes: the token when one is set, as for mutating calls. */
        {"/moe.v1.Peer/ForwardExperts", false, true, moed_on_forward_experts, NULL},
        {"/moe.v1.Peer/Ping", false, true, moed_on_ping, NULL},
        {"/moe.v1.Peer/NcclConnect", false, true, moed_on_nccl_connect, NULL},
        {"/grpc.health.v1.Health/Check", false, false, on_health, NULL},
    };

    for (size_t i = 0; i < MOE_ARRAY_SIZE(m); i++)
        m[i].arg = d;
    *ret = m;
    return (int)MOE_ARRAY_SIZE(m);
}
