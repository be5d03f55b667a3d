/*
 * The NCCL transport between peers: this node's NCCL, the communicators of
 * each peer (connected and accepted in the background, closed on threads of
 * their own), and moe.v1.Peer/NcclConnect.  Where moed is built without
 * NCCL, the same functions say so (cluster_int.h).
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

/* ---- the NCCL transport's communicators ------------------------------------------------- */

#ifdef MOED_HAVE_NCCL
_Atomic int moed_cl_nccl_closing; /* communicators being closed on threads of their own */

static void *nccl_close_main(void *arg)
{
    moe_nccl_close(arg);
    atomic_fetch_sub(&moed_cl_nccl_closing, 1);
    return NULL;
}

/* Closes comm on a thread of its own: its abort frees memory, which may
 * wait for every kernel on the device, among them another communicator's
 * that only its own close would stop; nobody waits for that here. */
void moed_cl_nccl_close_async(struct moe_nccl *comm)
{
    pthread_t t;

    if (!comm)
        return;
    atomic_fetch_add(&moed_cl_nccl_closing, 1);
    if (pthread_create(&t, NULL, nccl_close_main, comm) == 0) {
        pthread_detach(t);
        return;
    }
    atomic_fetch_sub(&moed_cl_nccl_closing, 1);
    moe_nccl_close(comm);
}
#endif

void moed_cl_nccl_link_close(struct nccl_link *l)
{
#ifdef MOED_HAVE_NCCL
    moed_cl_nccl_close_async(l->out);
    moed_cl_nccl_close_async(l->in);
#endif
    l->out = l->in = NULL;
}

/* What PeerInfo.nccl says of the link to p. */
void moed_cl_nccl_state(const struct moed_cluster *c, struct peer *p, char *buf, size_t len)
{
    struct nccl_link *l = &p->nl;
    bool out = atomic_load_explicit(&l->out_ready, memory_order_relaxed);

    if (!c->nccl_ok) {
        snprintf(buf, len, "%s", c->nccl_why);
        return;
    }
    pthread_mutex_lock(&p->lock);
    if (out)
        snprintf(buf, len, "ready");
    else if (!p->nl.remote[0])
        snprintf(buf, len, "unavailable: %s has no NCCL (not built, nccl = false, or no GPU)",
                 p->name);
    else if (l->failed[0])
        snprintf(buf, len, "failed: %s", l->failed);
    else
        snprintf(buf, len, "connecting");
    pthread_mutex_unlock(&p->lock);
}

#ifdef MOED_HAVE_NCCL
struct nccl_join {
    struct moed_cluster *c;
    struct peer *p; /* a reference */
    uint8_t id[MOE_NCCL_ID_BYTES];
    uint64_t gen;
};

/* Makes the communicator for the forwards this node sends p: a fresh id,
 * NcclConnect (p joins as rank 1 in the background), join as rank 0. */
static void *nccl_connect_main(void *arg)
{
    struct nccl_join *j = arg;
    struct moed_cluster *c = j->c;
    struct peer *p = j->p;
    struct nccl_link *l = &p->nl;
    Moe__V1__NcclConnectRequest q = MOE__V1__NCCL_CONNECT_REQUEST__INIT;
    struct moe_nccl *comm = NULL;
    struct moe_error err = {0};
    uint8_t buf[512], *ans = NULL;
    size_t alen = 0;
    struct moe_rpc_client *cl;
    int rc = moe_nccl_unique_id(j->id, &err);

    q.from = c->node;
    q.unique_id.data = j->id;
    q.unique_id.len = MOE_NCCL_ID_BYTES;
    q.generation = j->gen;
    cl = rc == 0 ? moed_cl_client_get(p, 0, err.msg, sizeof(err.msg)) : NULL;
    if (rc == 0 && !cl)
        rc = -EIO;
    if (rc == 0) {
        int st = moe_rpc_client_call(cl, "/moe.v1.Peer/NcclConnect", buf,
                                     moe__v1__nccl_connect_request__pack(&q, buf), &ans, &alen,
                                     err.msg, sizeof(err.msg));

        moed_cl_client_put(p, cl, st == GRPC_STATUS_OK);
        free(ans);
        rc = st == GRPC_STATUS_OK ? 0 : -EIO;
    }
    if (rc == 0)
        rc = moe_nccl_open(j->id, 2, 0, c->nccl_dev, NCCL_JOIN_MS, &comm, &err);
    pthread_mutex_lock(&l->out_lock);
    if (j->gen == l->out_gen) {
        moed_cl_nccl_close_async(l->out);
        l->out = comm;
        l->out_seq = 0;
        atomic_store_explicit(&l->out_ready, comm != NULL, memory_order_relaxed);
        comm = NULL;
        /* Each failure doubles the pause, 10 s to 10 min: a try that
         * fails leaves a thread in NCCL until the process ends. */
        if (rc < 0) {
            l->fails = MOE_MIN(l->fails + 1, 7);
            l->retry_ns = moe_now_ns() + (10000000000ull << (l->fails - 1));
        }
    }
    pthread_mutex_unlock(&l->out_lock);
    moed_cl_nccl_close_async(comm); /* a newer try went on meanwhile */
    pthread_mutex_lock(&p->lock);
    snprintf(l->failed, sizeof(l->failed), "%.199s", rc < 0 ? err.msg : "");
    pthread_mutex_unlock(&p->lock);
    if (rc == 0)
        moe_log(MOE_LOG_INFO, "cluster: NCCL to %s ready (generation %llu)", p->name,
                (unsigned long long)j->gen);
    else
        moe_log(MOE_LOG_WARN, "cluster: NCCL to %s: %s; gRPC meanwhile", p->name, err.msg);
    moed_cl_peer_put(c, p);
    free(j);
    atomic_fetch_sub(&c->nccl_joins, 1);
    return NULL;
}

/* After a ping: starts making the outgoing communicator to p when both
 * ends have NCCL, p is up and none is there or being made. */
void moed_cl_nccl_maybe_connect(struct moed_cluster *c, struct peer *p)
{
    struct nccl_link *l = &p->nl;
    struct nccl_join *j;
    bool remote;
    pthread_t t;

    if (!c->nccl_ok)
        return;
    /* An output the sender never took (it gave up, or died) leaves a
     * kernel spinning on this GPU: past twice the timeout, abort. */
    if (pthread_mutex_trylock(&l->in_lock) == 0) {
        uint64_t tmo = c->d->cfg.peer_timeout_ms;

        if (l->in && moe_nccl_pending(l->in) &&
            moe_now_ns() - l->in_post_ns > 2 * tmo * 1000000ull &&
            moe_nccl_wait(l->in, 0, NULL) < 0) {
            moed_cl_nccl_close_async(l->in);
            l->in = NULL;
        }
        pthread_mutex_unlock(&l->in_lock);
    }
    if (atomic_load(&p->state) != PEER_UP) {
        /* Down: its communicator goes now, not at the next forward's
         * timeout (unless a forward is on it: that one fails over). */
        if (pthread_mutex_trylock(&l->out_lock) == 0) {
            moed_cl_nccl_close_async(l->out);
            l->out = NULL;
            atomic_store_explicit(&l->out_ready, false, memory_order_relaxed);
            pthread_mutex_unlock(&l->out_lock);
        }
        return;
    }
    pthread_mutex_lock(&p->lock);
    remote = l->remote[0] != 0;
    pthread_mutex_unlock(&p->lock);
    if (!remote)
        return;
    if (pthread_mutex_trylock(&l->out_lock) != 0) /* a forward on it: fine */
        return;
    if (l->out || moe_now_ns() < l->retry_ns) {
        pthread_mutex_unlock(&l->out_lock);
        return;
    }
    /* One try at a time: the next waits for this one (or its failure). */
    l->retry_ns = moe_now_ns() + (NCCL_JOIN_MS + 1000) * 1000000ull;
    j = calloc(1, sizeof(*j));
    if (j)
        j->gen = ++l->out_gen;
    pthread_mutex_unlock(&l->out_lock);
    if (!j)
        return;
    j->c = c;
    j->p = p;
    pthread_mutex_lock(&c->lock);
    p->refs++;
    pthread_mutex_unlock(&c->lock);
    atomic_fetch_add(&c->nccl_joins, 1);
    if (pthread_create(&t, NULL, nccl_connect_main, j) != 0) {
        atomic_fetch_sub(&c->nccl_joins, 1);
        moed_cl_peer_put(c, p);
        free(j);
        return;
    }
    pthread_detach(t);
}

/* Joins, as rank 1, the communicator p made for the forwards it sends. */
static void *nccl_accept_main(void *arg)
{
    struct nccl_join *j = arg;
    struct moed_cluster *c = j->c;
    struct nccl_link *l = &j->p->nl;
    struct moe_nccl *comm = NULL, *old;
    struct moe_error err = {0};
    int rc;

    /* The old communicator goes (a transfer on it holds in_lock: waited
     * for); a stale generation is dropped. */
    pthread_mutex_lock(&l->in_lock);
    if (j->gen <= l->in_gen) {
        pthread_mutex_unlock(&l->in_lock);
        moe_log(MOE_LOG_WARN, "cluster: NCCL from %s: generation %llu is stale (have %llu)",
                j->p->name, (unsigned long long)j->gen, (unsigned long long)l->in_gen);
        goto out;
    }
    old = l->in;
    l->in = NULL;
    l->in_gen = j->gen;
    l->in_seq = 0;
    l->joining = true;
    pthread_cond_broadcast(&l->in_cond);
    pthread_mutex_unlock(&l->in_lock);
    moed_cl_nccl_close_async(old);
    rc = moe_nccl_open(j->id, 2, 1, c->nccl_dev, NCCL_JOIN_MS, &comm, &err);
    pthread_mutex_lock(&l->in_lock);
    if (l->in_gen == j->gen) {
        l->in = comm;
        l->joining = false;
        comm = NULL;
    }
    pthread_cond_broadcast(&l->in_cond);
    pthread_mutex_unlock(&l->in_lock);
    moed_cl_nccl_close_async(comm); /* superseded by a newer generation */
    if (rc < 0)
        moe_log(MOE_LOG_WARN, "cluster: NCCL from %s: %s", j->p->name, err.msg);
out:
    moed_cl_peer_put(c, j->p);
    free(j);
    atomic_fetch_sub(&c->nccl_joins, 1);
    return NULL;
}
#endif

void moed_on_nccl_connect(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    struct moed *d = arg;
    struct moed_cluster *c = cl_of(d);
    Moe__V1__NcclConnectRequest *q = moe__v1__nccl_connect_request__unpack(NULL, len, req);
    Moe__V1__NcclConnectResponse a = MOE__V1__NCCL_CONNECT_RESPONSE__INIT;
    struct peer *p = NULL;

    if (!q) {
        moe_rpc_fail(call, GRPC_STATUS_INVALID_ARGUMENT,
                     "the request is not an NcclConnectRequest");
        return;
    }
    if (q->unique_id.len != 128 || q->generation == 0) {
        moe_rpc_fail(call, GRPC_STATUS_INVALID_ARGUMENT,
                     "unique_id of %zu bytes, generation %llu: expected 128 bytes and a "
                     "generation from 1",
                     q->unique_id.len, (unsigned long long)q->generation);
        goto out;
    }
    p = c && q->from ? moed_cl_peer_find(c, q->from) : NULL;
    if (!p) {
        moe_rpc_fail(call, GRPC_STATUS_FAILED_PRECONDITION, "node %s has no peer called '%s'",
                     moed_cluster_node(d), q->from ? q->from : "");
        goto out;
    }
    if (!c->nccl_ok) {
        moe_rpc_fail(call, GRPC_STATUS_FAILED_PRECONDITION, "node %s cannot use NCCL: %s", c->node,
                     c->nccl_why);
        goto out;
    }
#ifdef MOED_HAVE_NCCL
    /* A generation not above the last one joined: refused now, not after
     * a 20 s join that the join thread would drop (busy: it checks). */
    if (pthread_mutex_trylock(&p->nl.in_lock) == 0) {
        uint64_t have = p->nl.in_gen;

        pthread_mutex_unlock(&p->nl.in_lock);
        if (q->generation <= have) {
            moe_rpc_fail(call, GRPC_STATUS_FAILED_PRECONDITION,
                         "generation %llu from %s is not above %llu, the last one joined",
                         (unsigned long long)q->generation, p->name, (unsigned long long)have);
            goto out;
        }
    }
    {
        struct nccl_join *j = calloc(1, sizeof(*j));
        pthread_t t;

        if (!j) {
            moe_rpc_fail(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
            goto out;
        }
        *j = (struct nccl_join){.c = c, .p = p, .gen = q->generation};
        memcpy(j->id, q->unique_id.data, MOE_NCCL_ID_BYTES);
        atomic_fetch_add(&c->nccl_joins, 1);
        if (pthread_create(&t, NULL, nccl_accept_main, j) != 0) {
            atomic_fetch_sub(&c->nccl_joins, 1);
            free(j);
            moe_rpc_fail(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "cannot start a thread");
            goto out;
        }
        pthread_detach(t);
        p = NULL; /* the thread's reference now */
        moed_reply_msg(call, &a.base);
    }
#else
    (void)a; /* !c->nccl_ok above: never reached */
#endif
out:
    if (p)
        moed_cl_peer_put(c, p);
    moe__v1__nccl_connect_request__free_unpacked(q, NULL);
}

/* Whether this node can use NCCL, and what it tells its peers. */
void moed_cl_nccl_init(struct moed_cluster *c)
{
    struct moed *d = c->d;

    c->nccl_dev = d->cfg.nccl_device >= 0 ? d->cfg.nccl_device : d->gpu >= 0 ? d->gpu : 0;
#ifdef MOED_HAVE_NCCL
    struct moe_error err = {0};

    if (!d->cfg.nccl) {
        snprintf(c->nccl_why, sizeof(c->nccl_why), "off: nccl = false here");
    } else if (moe_nccl_usable(c->nccl_dev, &err) < 0) {
        snprintf(c->nccl_why, sizeof(c->nccl_why), "unavailable here: %.180s", err.msg);
    } else {
        c->nccl_ok = true;
        snprintf(c->nccl_desc, sizeof(c->nccl_desc), "NCCL %s on CUDA device %d",
                 moe_nccl_version(), c->nccl_dev);
    }
#else
    snprintf(c->nccl_why, sizeof(c->nccl_why), "off: this moed was built without NCCL");
#endif
}
