/*
 * Several moed nodes as one expert pool: the cluster's lifecycle and
 * membership (start, stop, peers added and removed), its Status and Stats,
 * and the Control methods Placement, AddPeer and RemovePeer (cluster.h says
 * how the cluster's files work together).
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

/* ---- membership ------------------------------------------------------------------------ */

static int add_peer(struct moed_cluster *c, const char *name, const char *address,
                    struct moe_error *err)
{
    struct peer *p;

    if (strcmp(name, c->node) == 0)
        return moe_error_set(err, -EINVAL, "peer %s: that is this node's own name", name);
    p = moed_cl_peer_new(c->d, name, address);
    if (!p)
        return moe_error_set(err, -ENOMEM, "out of memory");
    p->link_close = moed_cl_nccl_link_close;
    pthread_mutex_lock(&c->lock);
    for (int i = 0; i < c->n_peers; i++)
        if (strcmp(c->peers[i]->name, name) == 0) {
            pthread_mutex_unlock(&c->lock);
            moed_cl_peer_free(p);
            return moe_error_set(err, -EEXIST, "peer %s is a member already", name);
        }
    if (c->n_peers == MOED_MAX_PEERS) {
        pthread_mutex_unlock(&c->lock);
        moed_cl_peer_free(p);
        return moe_error_set(err, -E2BIG, "%d peers already", MOED_MAX_PEERS);
    }
    p->refs = 1; /* the membership's */
    c->peers[c->n_peers++] = p;
    c->version++;
    c->kick = true;
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->lock);
    moe_log(MOE_LOG_INFO, "cluster: %s joins as peer %s (%s)", c->node, name, address);
    return 0;
}

static int remove_peer(struct moed_cluster *c, const char *name, struct moe_error *err)
{
    struct peer *p = NULL;

    pthread_mutex_lock(&c->lock);
    for (int i = 0; i < c->n_peers; i++)
        if (strcmp(c->peers[i]->name, name) == 0) {
            p = c->peers[i];
            c->peers[i] = c->peers[--c->n_peers];
            break;
        }
    if (p) {
        p->removed = true;
        c->version++;
        c->kick = true;
        pthread_cond_signal(&c->cond);
    }
    pthread_mutex_unlock(&c->lock);
    if (!p)
        return moe_error_set(err, -ENOENT, "no peer called %s", name);
    moed_cl_peer_put(c, p);
    moe_log(MOE_LOG_INFO, "cluster: peer %s removed", name);
    return 0;
}

int moed_cluster_start(struct moed *d, struct moe_error *err)
{
    struct moed_cluster *c = calloc(1, sizeof(*c));
    int rc = 0;

    if (!c)
        return moe_error_set(err, -ENOMEM, "out of memory");
    c->d = d;
    if (d->cfg.node_name && *d->cfg.node_name)
        snprintf(c->node, sizeof(c->node), "%s", d->cfg.node_name);
    else if (gethostname(c->node, sizeof(c->node) - 1) < 0 || !c->node[0])
        snprintf(c->node, sizeof(c->node), "moed");
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->cond, NULL);
    rc = moed_cl_pool_init(&c->parts, PART_THREADS, 0);
    if (rc == 0)
        rc = moed_cl_pool_init(&c->takes, TAKE_THREADS, TAKE_QUEUED);
    if (rc < 0)
        moe_error_set(err, rc, "out of memory");
    else
        rc = moed_cl_split_pool_init(c, d->cfg.max_split_forwards, err);
    if (rc < 0) {
        moed_cl_pool_free(&c->takes);
        moed_cl_pool_free(&c->parts);
        pthread_cond_destroy(&c->cond);
        pthread_mutex_destroy(&c->lock);
        free(c);
        return rc;
    }
    moed_cl_nccl_init(c);
    d->cluster = c;
    for (int i = 0; i < d->cfg.n_peers && rc == 0; i++)
        rc = add_peer(c, d->cfg.peers[i].name, d->cfg.peers[i].address, err);
    if (rc == 0 && pthread_create(&c->thread, NULL, moed_cl_health_main, c) != 0)
        rc = moe_error_set(err, -EAGAIN, "cannot start the cluster's health thread");
    c->started = rc == 0;
    if (rc < 0) {
        moed_cluster_stop(d);
        return rc;
    }
    if (c->n_peers)
        moe_log(MOE_LOG_INFO, "cluster: node %s with %d peer(s)", c->node, c->n_peers);
    return 0;
}

/* Waits until *a and *b (NULL: none) are 0, up to end_ns: 0 or -ETIMEDOUT. */
static int wait_zero(_Atomic int *a, _Atomic int *b, uint64_t end_ns)
{
    while (atomic_load(a) > 0 || (b && atomic_load(b) > 0)) {
        if (moe_now_ns() >= end_ns)
            return -ETIMEDOUT;
        usleep(1000);
    }
    return 0;
}

int moed_cluster_stop(struct moed *d)
{
    struct moed_cluster *c = cl_of(d);
    int rc = 0;

    if (!c)
        return 0;
    pthread_mutex_lock(&c->lock);
    c->stopping = true;
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->lock);
    if (c->started)
        pthread_join(c->thread, NULL);
    /* Split forwards still running call back into the scheduler, and NCCL
     * joins hold peers: wait (joins give up after NCCL_JOIN_MS, but a failed
     * one closes its communicator, which may wait for the device).  Past
     * the bound the threads keep c and the peers: leave them allocated. */
    if (wait_zero(&c->in_flight, &c->nccl_joins,
                  moe_now_ns() + MOED_NCCL_STOP_WAIT_MS * 1000000ull) < 0) {
        moe_log(MOE_LOG_WARN,
                "cluster: %d forwards and %d NCCL joins still running after %d ms; stopping "
                "without them",
                atomic_load(&c->in_flight), atomic_load(&c->nccl_joins), MOED_NCCL_STOP_WAIT_MS);
        d->cluster = NULL;
        return -ETIMEDOUT;
    }
    moed_cl_split_pool_free(c);
    moed_cl_pool_free(&c->parts);
    moed_cl_pool_free(&c->takes);
    for (int i = 0; i < c->n_peers; i++) {
        c->peers[i]->removed = true;
        moed_cl_peer_put(c, c->peers[i]);
    }
#ifdef MOED_HAVE_NCCL
    /* The peers' communicators, closing on threads of their own (they
     * touch nothing of c): bounded as the joins. */
    if (wait_zero(&moed_cl_nccl_closing, NULL, moe_now_ns() + MOED_NCCL_STOP_WAIT_MS * 1000000ull) <
        0) {
        moe_log(MOE_LOG_WARN,
                "cluster: %d NCCL communicators still closing after %d ms (an abort waits for "
                "the device); stopping without them",
                atomic_load(&moed_cl_nccl_closing), MOED_NCCL_STOP_WAIT_MS);
        rc = -ETIMEDOUT;
    }
#endif
    while (c->models) {
        struct mstate *s = c->models;

        c->models = s->next;
        free(s->load);
        free(s->hot);
        free((void *)s->hot_all);
        free(s->held);
        free(s->drop);
        free(s);
    }
    pthread_cond_destroy(&c->cond);
    pthread_mutex_destroy(&c->lock);
    free(c);
    d->cluster = NULL;
    return rc;
}

int moed_cluster_drain(struct moed *d, uint64_t timeout_ms)
{
    struct moed_cluster *c = cl_of(d);
    uint64_t end = moe_now_ns() + timeout_ms * 1000000ull;

    while (c && atomic_load(&c->in_flight) > 0) {
        if (moe_now_ns() >= end)
            return -ETIMEDOUT;
        usleep(1000);
    }
    return 0;
}

/* ---- Status and Stats ------------------------------------------------------------------ */

int moed_cluster_peers(struct moed *d, Moe__V1__PeerInfo ***ret, size_t *n_ret)
{
    struct moed_cluster *c = cl_of(d);
    struct view v;
    Moe__V1__PeerInfo **out;
    size_t n = 0;

    *ret = NULL;
    *n_ret = 0;
    if (!c)
        return 0;
    moed_cl_view_get(c, &v);
    out = calloc((size_t)v.n, sizeof(*out));
    for (int i = 0; out && i < v.n; i++) {
        struct peer *p = v.peer[i];
        Moe__V1__PeerInfo *pi;

        if (!p)
            continue;
        pi = malloc(sizeof(*pi));
        if (!pi)
            break;
        moe__v1__peer_info__init(pi);
        pi->name = strdup(p->name);
        pi->address = strdup(p->address);
        pi->state = (char *)moed_cl_peer_state_names[atomic_load(&p->state)];
        pi->rtt_ns = atomic_load(&p->rtt_ns);
        pi->pings_failed = atomic_load(&p->pings_failed);
        pi->calls = atomic_load(&p->calls);
        pi->calls_failed = atomic_load(&p->calls_failed);
        pi->tokens_sent = atomic_load(&p->tokens_sent);
        pi->bytes_sent = atomic_load(&p->bytes_sent);
        pi->bytes_received = atomic_load(&p->bytes_received);
        pthread_mutex_lock(&p->lock);
        pi->last_error = strdup(p->last_error);
        pthread_mutex_unlock(&p->lock);
        {
            char ns[256];

            moed_cl_nccl_state(c, p, ns, sizeof(ns));
            pi->nccl = strdup(ns);
        }
        pi->nccl_calls = atomic_load(&p->nl.calls);
        pi->nccl_bytes = atomic_load(&p->nl.bytes);
        pi->nccl_served = atomic_load(&p->nl.served);
        out[n++] = pi;
    }
    moed_cl_view_put(c, &v);
    *ret = out;
    *n_ret = n;
    return 0;
}

void moed_cluster_free_peers(Moe__V1__PeerInfo **p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(p[i]->name);
        free(p[i]->address);
        free(p[i]->last_error);
        free(p[i]->nccl);
        free(p[i]);
    }
    free(p);
}

void moed_cluster_counters(struct moed *d, Moe__V1__ClusterCounters *k)
{
    struct moed_cluster *c = cl_of(d);

    if (!c)
        return;
    k->forwards = atomic_load(&c->forwards);
    k->remote_calls = atomic_load(&c->remote_calls);
    k->failovers = atomic_load(&c->failovers);
    k->failover_local = atomic_load(&c->failover_local);
    k->tokens_remote = atomic_load(&c->tokens_remote);
    k->tokens_total = atomic_load(&c->tokens_total);
    k->bytes_sent = atomic_load(&c->bytes_sent);
    k->bytes_received = atomic_load(&c->bytes_received);
    k->peer_calls_served = atomic_load(&d->parts_served);
    k->nccl_fallbacks = atomic_load(&c->nccl_fallbacks);
    k->strays_evicted = atomic_load(&c->strays_evicted);
    pthread_mutex_lock(&c->lock);
    k->placement_version = c->version;
    pthread_mutex_unlock(&c->lock);
}

/* ---- Control: Placement, AddPeer, RemovePeer ------------------------------------------- */

void moed_on_placement(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    struct moed *d = arg;
    struct moed_cluster *c = cl_of(d);
    Moe__V1__PlacementRequest *q = moe__v1__placement_request__unpack(NULL, len, req);
    Moe__V1__PlacementResponse a = MOE__V1__PLACEMENT_RESPONSE__INIT;
    Moe__V1__PlacementEntry *ents = NULL, **pents = NULL;
    Moe__V1__NodeLoad nodes[MAX_MEMBERS], *pnodes[MAX_MEMBERS];
    char **rep_names = NULL;
    struct moed_model *mm = NULL;
    struct mstate *s = NULL;
    struct view v = {0};
    size_t ne = 0, cap;

    if (!q) {
        moe_rpc_fail(call, GRPC_STATUS_INVALID_ARGUMENT, "the request is not a PlacementRequest");
        return;
    }
    mm = q->model ? moed_model_get(d, q->model) : NULL;
    if (!mm || !c) {
        moe_rpc_fail(call, GRPC_STATUS_NOT_FOUND, "no model called '%s'", q->model ? q->model : "");
        goto out;
    }
    moed_cl_view_get(c, &v);
    pthread_mutex_lock(&c->lock);
    s = moed_cl_mstate_get(c, mm);
    pthread_mutex_unlock(&c->lock);
    cap = (size_t)mm->m->n_moe_layers * mm->m->cfg.n_experts;
    ents = calloc(cap ? cap : 1, sizeof(*ents));
    pents = calloc(cap ? cap : 1, sizeof(*pents));
    rep_names = calloc(cap * MAX_MEMBERS + 1, sizeof(*rep_names));
    if (!ents || !pents || !rep_names) {
        moe_rpc_fail(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        goto out;
    }
    for (int i = 0; i < v.n; i++) {
        moe__v1__node_load__init(&nodes[i]);
        nodes[i].name = (char *)v.name[i];
        nodes[i].state =
            (char *)(i == v.self ? "self"
                                 : moed_cl_peer_state_names[atomic_load(&v.peer[i]->state)]);
        pnodes[i] = &nodes[i];
    }
    for (int layer = 0; layer < mm->m->cfg.n_layers; layer++) {
        if (!mm->m->layers[layer].is_moe)
            continue;
        for (int e = 0; e < mm->m->cfg.n_experts; e++) {
            Moe__V1__PlacementEntry *pe = &ents[ne];
            int h[MAX_MEMBERS], nh = moed_cl_holders(c, &v, s, layer, e, h);
            uint64_t load = s ? atomic_load_explicit(&s->load[(size_t)layer * s->n_experts + e],
                                                     memory_order_relaxed)
                              : 0;

            moe__v1__placement_entry__init(pe);
            pe->layer = (uint32_t)layer;
            pe->expert = (uint32_t)e;
            pe->owner = (char *)v.name[h[0]];
            pe->n_replicas = (size_t)(nh - 1);
            pe->replicas = rep_names + ne * MAX_MEMBERS;
            for (int j = 1; j < nh; j++) {
                pe->replicas[j - 1] = (char *)v.name[h[j]];
                nodes[h[j]].replicas++;
            }
            pe->load = load;
            nodes[h[0]].experts++;
            nodes[h[0]].bytes += mm->m->expert_bytes;
            nodes[h[0]].load += load;
            pents[ne++] = pe;
        }
    }
    a.model = mm->name;
    pthread_mutex_lock(&c->lock);
    a.version = c->version;
    pthread_mutex_unlock(&c->lock);
    a.n_entries = ne;
    a.entries = pents;
    a.n_nodes = (size_t)v.n;
    a.nodes = pnodes;
    moed_reply_msg(call, &a.base);
out:
    moed_cl_view_put(c, &v);
    if (mm)
        moed_model_put(d, mm);
    free(ents);
    free(pents);
    free(rep_names);
    moe__v1__placement_request__free_unpacked(q, NULL);
}

void moed_on_add_peer(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    struct moed *d = arg;
    Moe__V1__AddPeerRequest *q = moe__v1__add_peer_request__unpack(NULL, len, req);
    Moe__V1__AddPeerResponse a = MOE__V1__ADD_PEER_RESPONSE__INIT;
    struct moed_config tmp = {0};
    struct moe_error err = {0};
    char spec[512];
    int rc;

    if (!q) {
        moe_rpc_fail(call, GRPC_STATUS_INVALID_ARGUMENT, "the request is not an AddPeerRequest");
        return;
    }
    /* The same check as a configured peer. */
    snprintf(spec, sizeof(spec), "%s %s", q->name ? q->name : "", q->address ? q->address : "");
    rc = moed_config_add_peer(&tmp, spec, "AddPeer", &err);
    if (rc == 0 && (strcmp(tmp.peers[0].name, q->name) || strcmp(tmp.peers[0].address, q->address)))
        rc = moe_error_set(&err, -EINVAL,
                           "AddPeer: name '%s' and address '%s': expected a name "
                           "without spaces and HOST:PORT",
                           q->name, q->address);
    if (rc == 0)
        rc = add_peer(cl_of(d), tmp.peers[0].name, tmp.peers[0].address, &err);
    moed_config_clear(&tmp);
    if (rc < 0)
        moe_rpc_fail(call, moed_grpc_status(rc), "%s", err.msg);
    else
        moed_reply_msg(call, &a.base);
    moe__v1__add_peer_request__free_unpacked(q, NULL);
}

void moed_on_remove_peer(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    struct moed *d = arg;
    Moe__V1__RemovePeerRequest *q = moe__v1__remove_peer_request__unpack(NULL, len, req);
    Moe__V1__RemovePeerResponse a = MOE__V1__REMOVE_PEER_RESPONSE__INIT;
    struct moe_error err = {0};

    if (!q) {
        moe_rpc_fail(call, GRPC_STATUS_INVALID_ARGUMENT, "the request is not a RemovePeerRequest");
        return;
    }
    if (remove_peer(cl_of(d), q->name ? q->name : "", &err) < 0)
        moe_rpc_fail(call, GRPC_STATUS_NOT_FOUND, "%s", err.msg);
    else
        moed_reply_msg(call, &a.base);
    moe__v1__remove_peer_request__free_unpacked(q, NULL);
}
