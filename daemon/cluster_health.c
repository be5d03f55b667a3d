/*
 * The cluster's health: pings to every peer (state, round trip, its hot
 * experts), the union of the hot sets, rebalancing on the measured load,
 * and moe.v1.Peer/Ping answered here (cluster_int.h).
 */
#include "cluster_int.h"
#include "placement.h"

#include "moed.h"

#include "log.h"
#include "rpc_client.h"

#include "dtype.h"
#include "moe.pb-c.h"

#ifdef MOED_HAVE_NCCL
#include "moe_nccl.h"
#endif

#include <errno.h>
#include <grpc/status.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ---- health and rebalancing ------------------------------------------------------------ */

/* Keeps the hot sets of p's answer to a ping. */
static bool take_hot(struct peer *p, const uint8_t *ans, size_t len)
{
    Moe__V1__PingResponse *a = moe__v1__ping_response__unpack(NULL, len, ans);
    struct peer_hot *h = NULL;
    size_t n = 0;

    if (a && a->n_hot) {
        h = calloc(a->n_hot, sizeof(*h));
        for (size_t i = 0; h && i < a->n_hot; i++) {
            const Moe__V1__HotExperts *x = a->hot[i];

            snprintf(h[n].model, sizeof(h[n].model), "%s", x->model ? x->model : "");
            h[n].experts = malloc((x->n_experts ? x->n_experts : 1) * sizeof(uint32_t));
            if (!h[n].experts)
                continue;
            if (x->n_experts)
                memcpy(h[n].experts, x->experts, x->n_experts * sizeof(uint32_t));
            h[n].n = x->n_experts;
            n++;
        }
    }
    bool serving = a && a->state && strcmp(a->state, "serving") == 0;

    pthread_mutex_lock(&p->lock);
    snprintf(p->nl.remote, sizeof(p->nl.remote), "%.95s", a && a->nccl ? a->nccl : "");
    moed_cl_peer_hot_clear(p);
    if (serving) {
        p->hot = h;
        p->n_hot = (int)n;
    } else {
        for (size_t i = 0; i < n; i++)
            free(h[i].experts);
        free(h);
    }
    pthread_mutex_unlock(&p->lock);
    if (a)
        moe__v1__ping_response__free_unpacked(a, NULL);
    return serving;
}

/* hot_all = this node's hot set and those of the peers that are up: every
 * node computes the same union, so they agree on the replicas.  Bumps the
 * placement version when it changes. */
static void merge_hot(struct moed_cluster *c)
{
    bool changed = false;

    pthread_mutex_lock(&c->lock);
    for (struct mstate *s = c->models; s; s = s->next) {
        size_t n = (size_t)s->n_layers * s->n_experts;
        uint8_t *u = malloc(n);

        if (!u)
            continue;
        memcpy(u, s->hot, n);
        for (int i = 0; i < c->n_peers; i++) {
            struct peer *p = c->peers[i];

            if (atomic_load(&p->state) != PEER_UP)
                continue;
            pthread_mutex_lock(&p->lock);
            for (int k = 0; k < p->n_hot; k++)
                if (strcmp(p->hot[k].model, s->name) == 0)
                    for (size_t j = 0; j < p->hot[k].n; j++)
                        if (p->hot[k].experts[j] < n)
                            u[p->hot[k].experts[j]] = 1;
            pthread_mutex_unlock(&p->lock);
        }
        for (size_t i = 0; i < n; i++) {
            changed |= atomic_load_explicit(&s->hot_all[i], memory_order_relaxed) != u[i];
            atomic_store_explicit(&s->hot_all[i], u[i], memory_order_relaxed);
        }
        free(u);
    }
    if (changed)
        c->version++;
    pthread_mutex_unlock(&c->lock);
}

static void ping_one(struct moed_cluster *c, struct peer *p)
{
    Moe__V1__PingRequest q = MOE__V1__PING_REQUEST__INIT;
    uint8_t buf[256], *ans = NULL;
    size_t len, alen = 0;
    char msg[256];
    struct moe_rpc_client *cl;
    uint64_t t0 = moe_now_ns();
    int st, was = atomic_load(&p->state), now;

    q.from = c->node;
    len = moe__v1__ping_request__pack(&q, buf);
    cl = moed_cl_client_get(p, (int)MOE_MIN(c->d->cfg.peer_timeout_ms, 1000), msg, sizeof(msg));
    st = cl ? moe_rpc_client_call(cl, "/moe.v1.Peer/Ping", buf, len, &ans, &alen, msg, sizeof(msg))
            : GRPC_STATUS_UNAVAILABLE;
    moe_rpc_client_close(cl);
    if (st == GRPC_STATUS_OK && !take_hot(p, ans, alen)) {
        /* It answers but takes no work (draining, stopping or failed):
         * down for requests, so that none pays a round trip to be refused. */
        st = GRPC_STATUS_UNAVAILABLE;
        snprintf(msg, sizeof(msg), "not serving (draining, stopping or failed)");
    }
    free(ans);
    if (st == GRPC_STATUS_OK) {
        atomic_store(&p->rtt_ns, moe_now_ns() - t0);
        now = PEER_UP;
        if (was != PEER_UP)
            moed_cl_set_error(p, ""); /* back: what failed before is history (logged) */
    } else {
        atomic_fetch_add_explicit(&p->pings_failed, 1, memory_order_relaxed);
        moed_cl_set_error(p, msg);
        /* A node that does not answer no longer votes for replicas. */
        pthread_mutex_lock(&p->lock);
        moed_cl_peer_hot_clear(p);
        pthread_mutex_unlock(&p->lock);
        now = st == GRPC_STATUS_UNAUTHENTICATED || st == GRPC_STATUS_PERMISSION_DENIED
                  ? PEER_REFUSED
                  : PEER_DOWN;
    }
    atomic_store(&p->state, now);
    if (now != was)
        moe_log(now == PEER_UP ? MOE_LOG_INFO : MOE_LOG_WARN, "cluster: peer %s (%s) is %s%s%s",
                p->name, p->address, moed_cl_peer_state_names[now], now == PEER_UP ? "" : ": ",
                now == PEER_UP ? "" : msg);
}

/* Chooses each model's hot experts again from the decayed load, and pages
 * in what this node newly holds; evicts what it dropped an interval ago. */
void moed_cl_rebalance(struct moed_cluster *c)
{
    struct moed *d = c->d;
    struct view v;

    pthread_mutex_lock(&c->lock);
    for (struct mstate *s = c->models; s; s = s->next) {
        size_t n = (size_t)s->n_layers * s->n_experts;
        uint32_t *l = malloc(n * sizeof(*l));

        if (!l)
            continue;
        for (size_t i = 0; i < n; i++) {
            /* Halve the counts: load decays with a half-life of one interval. */
            l[i] = atomic_load_explicit(&s->load[i], memory_order_relaxed);
            atomic_store_explicit(&s->load[i], l[i] / 2, memory_order_relaxed);
        }
        /* The version moves in merge_hot, with the union. */
        moed_placement_hot(l, n, d->cfg.hot_fraction, s->hot);
        free(l);
    }
    pthread_mutex_unlock(&c->lock);
    merge_hot(c);

    /* Apply the map to this node's cache. */
    moed_cl_view_get(c, &v);
    pthread_mutex_lock(&d->lock);
    for (int i = 0; i < d->n_models; i++) {
        struct moed_model *mm = d->models[i];
        const struct moe_model *m = mm->m;
        struct mstate *s;

        pthread_mutex_lock(&c->lock);
        s = moed_cl_mstate_get(c, mm);
        pthread_mutex_unlock(&c->lock);
        if (!s || v.n < 2) {
            moe_cache_set_prefetch_mask(d->cache, mm->cache_id, NULL, NULL); /* all here */
            continue;
        }
        for (int layer = 0; layer < m->cfg.n_layers; layer++) {
            if (!m->layers[layer].is_moe)
                continue;
            for (int e = 0; e < m->cfg.n_experts; e++) {
                size_t k = (size_t)layer * s->n_experts + e;
                int h[MAX_MEMBERS], nh = moed_cl_holders(c, &v, s, layer, e, h);
                bool mine = false, up = false;

                for (int j = 0; j < nh; j++) {
                    mine |= h[j] == v.self;
                    up |= moed_cl_member_up(&v, h[j]);
                }
                if (s->drop[k] && !mine)
                    moe_cache_evict(d->cache, mm->cache_id, layer, e, NULL); /* -EBUSY: later */
                else if (!mine && up && moe_cache_resident(d->cache, mm->cache_id, layer, e) &&
                         moe_cache_evict(d->cache, mm->cache_id, layer, e, NULL) == 0)
                    /* A stray copy (paged in here while its holders were
                     * down, or by a prefetch): back to its holders. */
                    atomic_fetch_add_explicit(&c->strays_evicted, 1, memory_order_relaxed);
                s->drop[k] = 0;
                if (mine && !s->held[k]) {
                    /* Newly held: page it in now (released at once; the
                     * page-in goes on), before the old holder drops it. */
                    struct moe_cache_ref ref;
                    int32_t ex = e;

                    if (moe_cache_acquire(d->cache, mm->cache_id, layer, &ex, 1, &ref, NULL) == 0)
                        moe_cache_release(d->cache, &ref, 1);
                } else if (!mine && s->held[k]) {
                    s->drop[k] = 1; /* evicted at the next rebalance */
                }
                s->held[k] = mine;
            }
        }
        /* Prefetch pages in only what this node holds: the rest is
         * computed elsewhere (and would be evicted as a stray). */
        moe_cache_set_prefetch_mask(d->cache, mm->cache_id, s->held, NULL);
    }
    pthread_mutex_unlock(&d->lock);
    moed_cl_view_put(c, &v);
}

void *moed_cl_health_main(void *arg)
{
    struct moed_cluster *c = arg;
    struct moed *d = c->d;
    uint64_t next_rebalance = moe_now_ns() + d->cfg.rebalance_interval_ms * 1000000ull;

    for (;;) {
        struct view v;
        struct timespec ts;
        uint64_t ms = d->cfg.ping_interval_ms;

        moed_cl_view_get(c, &v);
        for (int i = 0; i < v.n; i++)
            if (v.peer[i]) {
                ping_one(c, v.peer[i]);
#ifdef MOED_HAVE_NCCL
                moed_cl_nccl_maybe_connect(c, v.peer[i]);
#endif
            }
        moed_cl_view_put(c, &v);
        merge_hot(c);
        bool kicked;

        pthread_mutex_lock(&c->lock);
        kicked = c->kick;
        c->kick = false;
        pthread_mutex_unlock(&c->lock);
        if (moe_now_ns() >= next_rebalance || kicked) {
            moed_cl_rebalance(c);
            next_rebalance = moe_now_ns() + d->cfg.rebalance_interval_ms * 1000000ull;
        }
        pthread_mutex_lock(&c->lock);
        ts = moe_realtime_after_ms(ms);
        while (!c->stopping && !c->kick &&
               pthread_cond_timedwait(&c->cond, &c->lock, &ts) != ETIMEDOUT)
            ;
        if (c->stopping) {
            pthread_mutex_unlock(&c->lock);
            return NULL;
        }
        pthread_mutex_unlock(&c->lock);
    }
}

void moed_on_ping(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    struct moed *d = arg;
    Moe__V1__PingRequest *q = moe__v1__ping_request__unpack(NULL, len, req);
    Moe__V1__PingResponse a = MOE__V1__PING_RESPONSE__INIT;

    if (!q) {
        moe_rpc_fail(call, GRPC_STATUS_INVALID_ARGUMENT, "the request is not a PingRequest");
        return;
    }
    a.name = (char *)moed_cluster_node(d);
    a.uptime_ns = moe_now_ns() - d->t_start;
    a.state = (char *)moed_state_name(atomic_load(&d->state));
    a.nccl = cl_of(d) && cl_of(d)->nccl_ok ? cl_of(d)->nccl_desc : "";
    /* This node's own hot sets (not the union: no echo). */
    Moe__V1__HotExperts hx[16], *hp[16];
    size_t nh = 0;
    struct moed_cluster *c = cl_of(d);

    if (c) {
        pthread_mutex_lock(&c->lock);
        for (struct mstate *s = c->models; s && nh < 16; s = s->next) {
            size_t n = (size_t)s->n_layers * s->n_experts, k = 0;
            uint32_t *ex = malloc(n * sizeof(*ex));

            if (!ex)
                continue;
            for (size_t i = 0; i < n; i++)
                if (s->hot[i])
                    ex[k++] = (uint32_t)i;
            moe__v1__hot_experts__init(&hx[nh]);
            hx[nh].model = strdup(s->name);
            hx[nh].experts = ex;
            hx[nh].n_experts = k;
            hp[nh] = &hx[nh];
            nh++;
        }
        pthread_mutex_unlock(&c->lock);
    }
    a.hot = hp;
    a.n_hot = nh;
    moed_reply_msg(call, &a.base);
    for (size_t i = 0; i < nh; i++) {
        free(hx[i].model);
        free(hx[i].experts);
    }
    moe__v1__ping_request__free_unpacked(q, NULL);
}
