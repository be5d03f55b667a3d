/*
 * moe.v1.Peer/ForwardExperts, a peer's share of a split forward served
 * here: only its envelope (the protobuf message and the answer) and, when
 * its rows come over NCCL, their transfer on the take pool (c->takes); the
 * request itself is decoded and encoded by request.c and counted and
 * submitted by forward.c (moed_fwd_submit_part).
 */
#include "cluster_int.h"
#include "forward.h"

#include "moed.h"

#include "log.h"

#include "moe.pb-c.h"

#ifdef MOED_HAVE_NCCL
#include "moe_nccl.h"
#endif

#include <errno.h>
#include <grpc/status.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- moe.v1.Peer ----------------------------------------------------------------------- */

struct pfwd {
    struct moed_fwd fw; /* the request: rows, routing, model, answer (forward.h) */
    struct moe_rpc_call *call;
    unsigned flags; /* the engine's, for moed_fwd_submit_part */
    /* Over NCCL: the sending peer (a reference), generation and transfer. */
    struct peer *np;
    uint64_t ngen, nseq;
    struct cl_work work; /* on c->takes */
};

static void pfwd_free(struct pfwd *f)
{
    struct moed *d = f->fw.d;

    if (f->np) {
        struct moed_cluster *c = cl_of(d);

        moed_cl_peer_put(c, f->np);
        atomic_fetch_sub(&c->in_flight, 1); /* moed_cluster_stop waits for it */
    }
    moed_fwd_release(&f->fw);
    free(f);
}

/* The answer (forward.c's completion: the model already given back). */
static void pfwd_done(struct moed_fwd *fw, int status, const char *msg)
{
    struct pfwd *f = (struct pfwd *)fw; /* fw is its first member */
    const struct moe_sched_req *r = &fw->sr;
#ifdef MOED_HAVE_NCCL
    struct moed *d = f->fw.d;
#endif
    Moe__V1__ForwardExpertsResponse a = MOE__V1__FORWARD_EXPERTS_RESPONSE__INIT;
    Moe__V1__Tensor t = MOE__V1__TENSOR__INIT;
    Moe__V1__Timing tm = MOE__V1__TIMING__INIT;
    int64_t shape[2] = {f->fw.n_tokens, f->fw.hidden};
    size_t n = (size_t)f->fw.n_tokens * f->fw.hidden;
    char nmsg[MOE_ERROR_MSG_MAX];

#ifdef MOED_HAVE_NCCL
    if (status >= 0 && f->np) {
        /* The output goes back over the sender's communicator; the answer
         * only says it is there. */
        struct nccl_link *l = &f->np->nl;
        struct moe_error err = {0};
        struct moe_nccl_xfer y = {0, f->fw.out, n * sizeof(float)};

        /* Nobody else is on it in the protocol (the sender waits for this
         * answer): busy means something went wrong; the sender falls back
         * rather than this compute thread waiting. */
        if (pthread_mutex_trylock(&l->in_lock) != 0) {
            status =
                moe_error_set(&err, -EBUSY, "the NCCL communicator from %s is busy", f->np->name);
        } else {
            if (l->in && l->in_gen == f->ngen) {
                status = moe_nccl_post(l->in, &y, 1, NULL, 0, d->cfg.peer_timeout_ms, &err);
                l->in_post_ns = moe_now_ns();
                if (status < 0) {
                    moed_cl_nccl_close_async(l->in);
                    l->in = NULL;
                }
            } else {
                status = moe_error_set(&err, -EIO, "the NCCL communicator from %s went away",
                                       f->np->name);
            }
            pthread_mutex_unlock(&l->in_lock);
        }
        if (status < 0) {
            snprintf(nmsg, sizeof(nmsg), "%s", err.msg);
            msg = nmsg;
        }
    }
#else
    (void)nmsg;
    (void)n;
#endif
    if (status < 0) {
        moe_rpc_fail(f->call, moed_grpc_status(status), "%s", msg);
    } else {
        t.n_shape = 2;
        t.shape = shape;
        t.dtype = f->fw.dtype;
        /* Over NCCL the output went back that way; the answer only says so. */
        t.data.data = f->np ? NULL : (uint8_t *)f->fw.out;
        t.data.len = f->np ? 0 : moed_fwd_encode_in_place(&f->fw);
        tm.queue_ns = r->queue_ns;
        tm.route_ns = r->st.route_ns;
        tm.load_ns = r->st.load_ns;
        tm.compute_ns = r->st.compute_ns;
        tm.total_ns = moe_now_ns() - f->fw.t_recv;
        tm.batch_requests = (uint32_t)r->batch_requests;
        tm.batch_tokens = (uint32_t)r->batch_tokens;
        a.output = &t;
        a.timing = &tm;
        a.cache_hits = (uint32_t)r->st.hits;
        a.cache_misses = (uint32_t)r->st.misses;
        moed_reply_msg(f->call, &a.base);
    }
    pfwd_free(f);
}

#ifdef MOED_HAVE_NCCL
/* Takes a forward's rows over the sender's communicator, in the sender's
 * order, then submits it; pfwd_done sends the output back. */
static void nccl_take(struct pfwd *f)
{
    struct moed *d = f->fw.d;
    struct nccl_link *l = &f->np->nl;
    struct moe_error err = {0};
    size_t n = (size_t)f->fw.n_tokens * f->fw.hidden;
    uint64_t tmo = d->cfg.peer_timeout_ms, end = moe_now_ns() + tmo * 1000000ull;
    struct timespec ts;
    int st = GRPC_STATUS_FAILED_PRECONDITION, rc = -EIO;

    ts = moe_realtime_after_ms(tmo);
    pthread_mutex_lock(&l->in_lock);
    /* The first transfer of a generation may come before this node's
     * join has finished (the sender's finished first). */
    while (l->in_gen == f->ngen && l->joining && moe_now_ns() < end)
        pthread_cond_timedwait(&l->in_cond, &l->in_lock, &ts);
    if (l->in_gen != f->ngen || !l->in) {
        moe_error_set(&err, -EIO, "no NCCL communicator of generation %llu from %s (have %llu)",
                      (unsigned long long)f->ngen, f->np->name, (unsigned long long)l->in_gen);
    } else if (f->nseq != l->in_seq + 1) {
        moe_error_set(&err, -EIO, "NCCL transfer %llu from %s out of order: expected %llu",
                      (unsigned long long)f->nseq, f->np->name,
                      (unsigned long long)(l->in_seq + 1));
    } else {
        struct moe_nccl_xfer x = {0, (void *)f->fw.x, n * sizeof(float)};

        rc = moe_nccl_exchange(l->in, NULL, 0, &x, 1, tmo, &err);
        if (rc < 0) {
            moed_cl_nccl_close_async(l->in);
            l->in = NULL;
            st = GRPC_STATUS_UNAVAILABLE;
        } else {
            l->in_seq = f->nseq;
        }
    }
    pthread_mutex_unlock(&l->in_lock);
    /* The rows are this request's own (moed_fwd_decode_peer made x):
     * checked where they lie. */
    if (rc == 0 && moed_fwd_set_hidden(&f->fw, f->fw.n_tokens, MOE__V1__DTYPE__DTYPE_F32, f->fw.x,
                                       true, "hidden", err.msg, sizeof(err.msg)) < 0) {
        rc = -EINVAL;
        st = GRPC_STATUS_INVALID_ARGUMENT;
    }
    if (rc == 0) {
        atomic_fetch_add_explicit(&l->served, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&l->bytes, 2 * n * sizeof(float), memory_order_relaxed);
        rc = moed_fwd_submit_part(&f->fw, f->flags, pfwd_done, NULL, err.msg, sizeof(err.msg));
        st = moed_grpc_status(rc);
    }
    if (rc < 0) {
        moe_rpc_fail(f->call, st, "%s", err.msg);
        pfwd_free(f);
    }
}

static void take_run(struct cl_work *w)
{
    nccl_take((struct pfwd *)((char *)w - offsetof(struct pfwd, work)));
}

/* Queues f for c->takes: 0, or -EAGAIN when TAKE_QUEUED calls wait already
 * or no thread can run it (f is still the caller's). */
static int take_hand_over(struct moed_cluster *c, struct pfwd *f)
{
    f->work.run = take_run;
    return moed_cl_pool_post(&c->takes, &f->work);
}
#endif

void moed_on_forward_experts(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    struct moed *d = arg;
    struct moed_cluster *c = cl_of(d);
    Moe__V1__ForwardExpertsRequest *q = moe__v1__forward_experts_request__unpack(NULL, len, req);
    struct pfwd *f = calloc(1, sizeof(*f));
    char msg[MOE_ERROR_MSG_MAX];
    int r;

    if (!q || !f) {
        moe_rpc_fail(call, q ? GRPC_STATUS_RESOURCE_EXHAUSTED : GRPC_STATUS_INVALID_ARGUMENT, "%s",
                     q ? "out of memory" : "the request is not a ForwardExpertsRequest");
        goto out;
    }
    /* A peer's share is counted as one (forward.c), not among the
     * clients' requests: the transport field is unused. */
    moed_fwd_init(&f->fw, d, MOED_TRANSPORT_GRPC);
    f->call = call;
    f->flags = q->shared ? 0 : MOE_FWD_SKIP_SHARED;
    if (atomic_load(&d->state) != MOED_SERVING) {
        moe_rpc_fail(call, GRPC_STATUS_UNAVAILABLE, "moed (node %s) is not serving: %s%s%s",
                     moed_cluster_node(d), moed_state_name(atomic_load(&d->state)),
                     *moed_fatal_reason(d) ? ": " : "", moed_fatal_reason(d));
        goto out;
    }
    f->fw.mm = q->model ? moed_model_get(d, q->model) : NULL;
    if (!f->fw.mm) {
        moe_rpc_fail(call, GRPC_STATUS_NOT_FOUND, "node %s has no model '%s'", moed_cluster_node(d),
                     q->model ? q->model : "");
        goto out;
    }
    r = moed_fwd_decode_peer(&f->fw, q, f->fw.mm->m, msg, sizeof(msg));
    if (r < 0) {
        moe_rpc_fail(call,
                     r == -ENOMEM ? GRPC_STATUS_RESOURCE_EXHAUSTED : GRPC_STATUS_INVALID_ARGUMENT,
                     "%s", msg);
        goto out;
    }
    if (q->nccl_seq || q->nccl_generation) {
        /* The rows come over NCCL, waited for on the take pool, which
         * submits the request once they are here. */
        f->np = c && q->from ? moed_cl_peer_find(c, q->from) : NULL;
        if (f->np)
            atomic_fetch_add(&c->in_flight, 1); /* until pfwd_free */
        f->ngen = q->nccl_generation;
        f->nseq = q->nccl_seq;
        if (!f->np || !c->nccl_ok) {
            if (!f->np)
                moe_rpc_fail(call, GRPC_STATUS_FAILED_PRECONDITION,
                             "node %s: the sender '%s' is not a peer of this node",
                             moed_cluster_node(d), q->from ? q->from : "");
            else
                moe_rpc_fail(call, GRPC_STATUS_FAILED_PRECONDITION, "node %s cannot use NCCL: %s",
                             c->node, c->nccl_why);
            goto out;
        }
#ifdef MOED_HAVE_NCCL
        if (take_hand_over(c, f) == 0) {
            f = NULL;
            goto out;
        }
#endif
        moe_rpc_fail(
            call, GRPC_STATUS_RESOURCE_EXHAUSTED,
            "node %s: %d NCCL transfers wait already (or no thread to take them); try again",
            moed_cluster_node(d), TAKE_QUEUED);
        goto out;
    }
    r = moed_fwd_submit_part(&f->fw, f->flags, pfwd_done, NULL, msg, sizeof(msg));
    if (r < 0) {
        moe_rpc_fail(call, moed_grpc_status(r), "%s", msg);
        goto out;
    }
    f = NULL;
out:
    if (f)
        pfwd_free(f);
    if (q)
        moe__v1__forward_experts_request__free_unpacked(q, NULL);
}
