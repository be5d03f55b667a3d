/*
 * The remote forward, the sending end: a request split over the members
 * (its parts to peers on the part pool, with failover to a replica or to
 * this node; the split forwards on a pool of their own, capped).  The
 * receiving end, moe.v1.Peer/ForwardExperts, is cluster_serve.c.
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
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ---- running forwards on this node ----------------------------------------------------- */

struct sync_req {
    struct moe_sched_req r;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool done;
    int status;
    char msg[MOE_ERROR_MSG_MAX];
};

static void sync_done(struct moe_sched_req *r, int status, const char *msg)
{
    struct sync_req *s = r->arg;

    pthread_mutex_lock(&s->lock);
    s->status = status;
    snprintf(s->msg, sizeof(s->msg), "%s", msg ? msg : "");
    s->done = true;
    pthread_cond_signal(&s->cond);
    pthread_mutex_unlock(&s->lock);
}

/* A forward through the scheduler, waited for (it batches with others). */
static int run_local(struct moed *d, struct moed_model *mm, int layer, const float *x, int T,
                     const int32_t *ids, const float *w, unsigned flags, float *out,
                     struct moe_sched_req *result, struct moe_error *err)
{
    struct sync_req s = {0};
    int r;

    s.r = (struct moe_sched_req){.engine = mm->e,
                                 .a.layer = layer,
                                 .a.x = x,
                                 .a.n_tokens = T,
                                 .a.ids = ids,
                                 .a.weights = w,
                                 .a.flags = flags,
                                 .a.out = out,
                                 .done = sync_done,
                                 .arg = &s};
    pthread_mutex_init(&s.lock, NULL);
    pthread_cond_init(&s.cond, NULL);
    r = moe_sched_submit(d->sched, &s.r, err);
    if (r == 0) {
        pthread_mutex_lock(&s.lock);
        while (!s.done)
            pthread_cond_wait(&s.cond, &s.lock);
        pthread_mutex_unlock(&s.lock);
        r = s.status;
        if (r < 0)
            moe_error_set(err, r, "%s", s.msg);
        if (result) {
            result->st = s.r.st;
            result->queue_ns = s.r.queue_ns;
            result->batch_requests = s.r.batch_requests;
            result->batch_tokens = s.r.batch_tokens;
        }
    }
    pthread_cond_destroy(&s.cond);
    pthread_mutex_destroy(&s.lock);
    return r;
}

/* ---- a split forward ------------------------------------------------------------------- */

/* The rows and slots sent to one member. */
struct part {
    struct moed_cluster *c;
    struct moed_model *mm;
    const struct view *v;
    const struct mstate *s;
    int member; /* where it goes first */
    int layer, H, K;
    int rows;
    int32_t *row; /* [rows]: the request's token of each */
    float *x;     /* [rows, H] */
    int32_t *ids; /* [rows, K], -1 where another member computes it */
    float *w;     /* [rows, K] */
    float *out;   /* [rows, H]: this part's share */
    uint32_t hits, misses;
    int status;
    char msg[256];
    struct split_wait *wait; /* its split forward's, when on the pool */
    struct cl_work work;     /* on c->parts */
};

/* The ForwardExperts of rows [r0, r0 + rows) of the part with ids (the
 * part's layout); t and shape are q's hidden tensor. */
static void chunk_request(const struct part *pt, int r0, int rows, const int32_t *ids,
                          Moe__V1__ForwardExpertsRequest *q, Moe__V1__Tensor *t, int64_t *shape)
{
    size_t xo = (size_t)r0 * pt->H, ko = (size_t)r0 * pt->K;

    q->output_dtype = MOE__V1__DTYPE__DTYPE_F32;
    shape[0] = rows;
    shape[1] = pt->H;
    t->n_shape = 2;
    t->shape = shape;
    t->dtype = MOE__V1__DTYPE__DTYPE_F32;
    t->data.data = (uint8_t *)(pt->x + xo);
    t->data.len = (size_t)rows * (size_t)pt->H * sizeof(float);
    q->model = pt->mm->name;
    q->layer = (uint32_t)pt->layer;
    q->hidden = t;
    q->top_k = (uint32_t)pt->K;
    q->n_expert_ids = (size_t)rows * pt->K;
    q->expert_ids = (int32_t *)ids + ko;
    q->n_weights = q->n_expert_ids;
    q->weights = pt->w + ko;
    q->shared = false;
    q->from = pt->c->node;
}

/* Sends q to p and unpacks its answer, checking the output's shape (with
 * its data, or without: over NCCL).  0, or -errno with pt->msg. */
static int peer_call(struct part *pt, struct peer *p, const Moe__V1__ForwardExpertsRequest *q,
                     int rows, bool data, Moe__V1__ForwardExpertsResponse **ret)
{
    const bool bf16 = q->output_dtype == MOE__V1__DTYPE__DTYPE_BF16;
    struct moed_cluster *c = pt->c;
    Moe__V1__ForwardExpertsResponse *a = NULL;
    size_t n = (size_t)rows * (size_t)pt->H, len, alen = 0;
    uint8_t *buf, *ans = NULL;
    struct moe_rpc_client *cl;
    char msg[256];
    int st;

    *ret = NULL;
    len = moe__v1__forward_experts_request__get_packed_size(q);
    buf = malloc(len);
    cl = buf ? moed_cl_client_get(p, 0, msg, sizeof(msg)) : NULL;
    if (!cl) {
        snprintf(pt->msg, sizeof(pt->msg), "%.40s: %.200s", p->name, buf ? msg : "out of memory");
        free(buf);
        atomic_fetch_add_explicit(&p->calls_failed, 1, memory_order_relaxed);
        return -ENOMEM;
    }
    moe__v1__forward_experts_request__pack(q, buf);
    atomic_fetch_add_explicit(&p->calls, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&p->tokens_sent, (uint64_t)rows, memory_order_relaxed);
    atomic_fetch_add_explicit(&p->bytes_sent, len, memory_order_relaxed);
    atomic_fetch_add_explicit(&c->remote_calls, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&c->tokens_remote, (uint64_t)rows, memory_order_relaxed);
    atomic_fetch_add_explicit(&c->bytes_sent, len, memory_order_relaxed);
    st = moe_rpc_client_call(cl, "/moe.v1.Peer/ForwardExperts", buf, len, &ans, &alen, msg,
                             sizeof(msg));
    free(buf);
    moed_cl_client_put(p, cl, st == GRPC_STATUS_OK);
    if (st != GRPC_STATUS_OK) {
        snprintf(pt->msg, sizeof(pt->msg), "%.40s: %.200s", p->name, msg);
        moed_cl_set_error(p, msg);
        /* Not reachable or too slow: the next requests go elsewhere at
         * once, not after a timeout each; its next ping brings it back. */
        if (st == GRPC_STATUS_UNAVAILABLE || st == GRPC_STATUS_DEADLINE_EXCEEDED)
            atomic_store(&p->state, PEER_DOWN);
        atomic_fetch_add_explicit(&p->calls_failed, 1, memory_order_relaxed);
        free(ans);
        return -EIO;
    }
    atomic_fetch_add_explicit(&p->bytes_received, alen, memory_order_relaxed);
    atomic_fetch_add_explicit(&c->bytes_received, alen, memory_order_relaxed);
    a = moe__v1__forward_experts_response__unpack(NULL, alen, ans);
    free(ans);
    if (!a || !a->output || a->output->n_shape != 2 || a->output->shape[0] != rows ||
        a->output->shape[1] != pt->H || a->output->dtype != q->output_dtype ||
        a->output->data.len != (data ? n * (bf16 ? 2 : 4) : 0)) {
        snprintf(pt->msg, sizeof(pt->msg), "%s answered an output of the wrong shape", p->name);
        atomic_fetch_add_explicit(&p->calls_failed, 1, memory_order_relaxed);
        if (a)
            moe__v1__forward_experts_response__free_unpacked(a, NULL);
        return -EPROTO;
    }
    pt->hits += a->cache_hits;
    pt->misses += a->cache_misses;
    *ret = a;
    return 0;
}

/* out += y, n elements of y in f32 or bf16 (little-endian bytes). */
static void add_into(float *out, const uint8_t *y, size_t n, bool bf16)
{
    for (size_t i = 0; i < n; i++) {
        float v;

        if (bf16) {
            uint16_t h;

            memcpy(&h, y + 2 * i, 2);
            v = moe_bf16_to_f32(h);
        } else {
            memcpy(&v, y + 4 * i, 4);
        }
        out[i] += v;
    }
}

#ifdef MOED_HAVE_NCCL
/* The chunk over NCCL (nccl_link says how): 0 done, 1 not over NCCL (no
 * communicator, or it just failed: the caller sends it over gRPC). */
static int nccl_chunk(struct part *pt, int m, int r0, int rows, const int32_t *ids, float *out)
{
    struct moed_cluster *c = pt->c;
    struct peer *p = pt->v->peer[m];
    struct nccl_link *l = &p->nl;
    Moe__V1__ForwardExpertsRequest q = MOE__V1__FORWARD_EXPERTS_REQUEST__INIT;
    Moe__V1__Tensor t = MOE__V1__TENSOR__INIT;
    Moe__V1__ForwardExpertsResponse *a = NULL;
    int64_t shape[2];
    size_t n = (size_t)rows * (size_t)pt->H, xo = (size_t)r0 * pt->H;
    uint64_t tmo = c->d->cfg.peer_timeout_ms;
    struct moe_error err = {0};
    uint32_t hits = pt->hits, misses = pt->misses; /* the gRPC retry counts them */
    float *y;
    int rc;

    if (!c->nccl_ok || !atomic_load_explicit(&l->out_ready, memory_order_relaxed))
        return 1;
    /* One forward at a time on the communicator: others meanwhile go over
     * gRPC rather than queue behind it. */
    if (pthread_mutex_trylock(&l->out_lock) != 0)
        return 1;
    /* Larger than the staging made at join: over gRPC (call_peer sizes
     * chunks to fit; growing it would wait for the whole device). */
    if (!l->out || n * sizeof(float) > moe_nccl_capacity(l->out) / 2) {
        pthread_mutex_unlock(&l->out_lock);
        return 1;
    }
    y = malloc(n * sizeof(float));
    chunk_request(pt, r0, rows, ids, &q, &t, shape);
    q.nccl_generation = l->out_gen;
    q.nccl_seq = l->out_seq + 1;
    t.data.data = NULL;
    t.data.len = 0;
    {
        struct moe_nccl_xfer x = {1, pt->x + xo, n * sizeof(float)};

        rc = y ? moe_nccl_post(l->out, &x, 1, NULL, 0, tmo, &err) : -ENOMEM;
    }
    if (rc == 0) {
        rc = peer_call(pt, p, &q, rows, false, &a);
        if (rc < 0)
            snprintf(err.msg, sizeof(err.msg), "%s", pt->msg);
    }
    if (rc == 0) {
        struct moe_nccl_xfer r = {1, y, n * sizeof(float)};

        rc = moe_nccl_exchange(l->out, NULL, 0, &r, 1, tmo, &err);
    }
    if (a)
        moe__v1__forward_experts_response__free_unpacked(a, NULL);
    if (rc < 0) {
        /* Aborted: the peer's side times out or is replaced by the next
         * generation; gRPC meanwhile, NCCL again after a pause. */
        moed_cl_nccl_close_async(l->out);
        l->out = NULL;
        atomic_store_explicit(&l->out_ready, false, memory_order_relaxed);
        /* The pause doubles with each failure in a row, a join's or a
         * transfer's, from 10 s to about 10 min. */
        l->fails = MOE_MIN(l->fails + 1, 7);
        l->retry_ns = moe_now_ns() + (10000000000ull << (l->fails - 1));
        pthread_mutex_unlock(&l->out_lock);
        pthread_mutex_lock(&p->lock);
        snprintf(l->failed, sizeof(l->failed), "%.199s", err.msg);
        pthread_mutex_unlock(&p->lock);
        atomic_fetch_add_explicit(&c->nccl_fallbacks, 1, memory_order_relaxed);
        moe_log_once(MOE_LOG_WARN, "cluster: NCCL to %s: %s; over gRPC (logged once)", p->name,
                     err.msg);
        pt->hits = hits;
        pt->misses = misses;
        free(y);
        return 1;
    }
    l->out_seq++;
    l->fails = 0;
    pthread_mutex_unlock(&l->out_lock);
    atomic_fetch_add_explicit(&l->calls, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&l->bytes, 2 * n * sizeof(float), memory_order_relaxed);
    add_into(out + xo, (const uint8_t *)y, n, false);
    free(y);
    return 0;
}
#endif

/* One ForwardExperts to member m: rows [r0, r0 + rows) of the part with
 * ids (the part's layout), over NCCL where there is a communicator, else
 * gRPC; the answer is added into out (the part's layout).  0 or -errno
 * with pt->msg. */
static int call_chunk(struct part *pt, int m, int r0, int rows, const int32_t *ids, float *out)
{
    Moe__V1__ForwardExpertsRequest q = MOE__V1__FORWARD_EXPERTS_REQUEST__INIT;
    Moe__V1__Tensor t = MOE__V1__TENSOR__INIT;
    Moe__V1__ForwardExpertsResponse *a = NULL;
    const bool bf16 = pt->c->d->cfg.peer_bf16;
    size_t n = (size_t)rows * pt->H;
    uint16_t *xb = NULL;
    int64_t shape[2];
    int rc;

#ifdef MOED_HAVE_NCCL
    if (nccl_chunk(pt, m, r0, rows, ids, out) == 0)
        return 0;
#endif
    chunk_request(pt, r0, rows, ids, &q, &t, shape);
    if (bf16) {
        /* Half the bytes both ways; the sums stay f32 on both ends. */
        xb = malloc(n * sizeof(*xb));
        if (!xb) {
            snprintf(pt->msg, sizeof(pt->msg), "out of memory");
            return -ENOMEM;
        }
        for (size_t i = 0; i < n; i++)
            xb[i] = moe_f32_to_bf16(pt->x[(size_t)r0 * pt->H + i]);
        t.dtype = MOE__V1__DTYPE__DTYPE_BF16;
        t.data.data = (uint8_t *)xb;
        t.data.len = n * sizeof(*xb);
        q.output_dtype = MOE__V1__DTYPE__DTYPE_BF16;
    }
    rc = peer_call(pt, pt->v->peer[m], &q, rows, true, &a);
    free(xb);
    if (rc == 0) {
        add_into(out + (size_t)r0 * pt->H, a->output->data.data, n, bf16);
        moe__v1__forward_experts_response__free_unpacked(a, NULL);
    }
    return rc;
}

/* ForwardExperts of the part's rows and ids (which may be a failover's
 * subset) to member m, in calls of at most peer_max_rows rows (by default
 * what fits max_message_bytes, the peer's limit too when the cluster is
 * configured alike); the answer is added into out only when every call
 * succeeded, so that a failover never counts a share twice.  0 or -errno. */
static int call_peer(struct part *pt, int m, const int32_t *ids, float *out)
{
    const struct moed_config *cfg = &pt->c->d->cfg;
    size_t row_bytes = (size_t)pt->H * (cfg->peer_bf16 ? 2 : 4) + (size_t)pt->K * 16;
    int max_rows = cfg->peer_max_rows, rc = 0;
    float *tmp;

    if (max_rows <= 0) {
        uint64_t room = cfg->max_message_bytes * 9 / 10;

        max_rows = (int)MOE_MIN(room > 4096 ? (room - 4096) / row_bytes : 1, INT32_MAX);
        if (max_rows < 1)
            max_rows = 1;
    }
#ifdef MOED_HAVE_NCCL
    /* Over NCCL, chunks that fit the staging both ends made at join. */
    if (pt->c->nccl_ok && atomic_load_explicit(&pt->v->peer[m]->nl.out_ready, memory_order_relaxed))
        max_rows = MOE_MAX(
            1, MOE_MIN(max_rows, (int)(MOE_NCCL_STAGING_BYTES / ((size_t)pt->H * sizeof(float)))));
#endif
    tmp = calloc((size_t)pt->rows * pt->H, sizeof(float));
    if (!tmp) {
        snprintf(pt->msg, sizeof(pt->msg), "out of memory");
        return -ENOMEM;
    }
    for (int r0 = 0; r0 < pt->rows && rc == 0; r0 += max_rows)
        rc = call_chunk(pt, m, r0, MOE_MIN(max_rows, pt->rows - r0), ids, tmp);
    if (rc == 0)
        for (size_t i = 0; i < (size_t)pt->rows * pt->H; i++)
            out[i] += tmp[i];
    free(tmp);
    return rc;
}

/* Runs a part: its member, and on failure each slot's next holder that is
 * up, or this node. */
static void *part_main(void *arg)
{
    struct part *pt = arg;
    struct moed_cluster *c = pt->c;
    size_t nk = (size_t)pt->rows * (size_t)pt->K;
    int32_t *alt;
    struct moe_error err = {0};
    int targets[MAX_MEMBERS], nt = 0;

    pt->status = call_peer(pt, pt->member, pt->ids, pt->out);
    if (pt->status == 0)
        return NULL;
    /* Failover: every slot to another holder that is up, else here. */
    atomic_fetch_add_explicit(&c->failovers, 1, memory_order_relaxed);
    moe_log_once(MOE_LOG_WARN, "cluster: %s; failing over (logged once)", pt->msg);
    alt = malloc(nk * sizeof(*alt));
    if (!alt) {
        pt->status = -ENOMEM;
        return NULL;
    }
    memset(pt->out, 0, (size_t)pt->rows * pt->H * sizeof(float));
    {
        int32_t *to = malloc(nk * sizeof(*to));

        if (!to) {
            free(alt);
            pt->status = -ENOMEM;
            return NULL;
        }
        for (size_t i = 0; i < nk; i++) {
            to[i] = -1;
            if (pt->ids[i] < 0)
                continue;
            to[i] = moed_cl_pick(c, pt->v, pt->s, pt->layer, pt->ids[i], (uint32_t)i, pt->member);
            bool seen = false;

            for (int k = 0; k < nt; k++)
                seen |= targets[k] == to[i];
            if (!seen)
                targets[nt++] = to[i];
        }
        pt->status = 0;
        for (int k = 0; k < nt && pt->status == 0; k++) {
            int m = targets[k];

            for (size_t i = 0; i < nk; i++)
                alt[i] = to[i] == m ? pt->ids[i] : -1;
            if (m != pt->v->self && call_peer(pt, m, alt, pt->out) == 0)
                continue;
            /* Here: paged in locally if it must be. */
            atomic_fetch_add_explicit(&c->failover_local, 1, memory_order_relaxed);
            float *y = malloc((size_t)pt->rows * pt->H * sizeof(float));
            struct moe_sched_req res = {0};

            pt->status = y ? run_local(c->d, pt->mm, pt->layer, pt->x, pt->rows, alt, pt->w,
                                       MOE_FWD_PARTIAL | MOE_FWD_SKIP_SHARED, y, &res, &err)
                           : -ENOMEM;
            if (pt->status == 0) {
                for (size_t i = 0; i < (size_t)pt->rows * pt->H; i++)
                    pt->out[i] += y[i];
                pt->hits += (uint32_t)res.st.hits;
                pt->misses += (uint32_t)res.st.misses;
            } else {
                snprintf(pt->msg, sizeof(pt->msg), "failover here: %.230s", err.msg);
            }
            free(y);
        }
        free(to);
    }
    free(alt);
    return NULL;
}

static void part_clear(struct part *pt)
{
    free(pt->row);
    free(pt->x);
    free(pt->ids);
    free(pt->w);
    free(pt->out);
}

/* A part's run on a thread of c->parts; its split forward waits for it. */
static void part_run(struct cl_work *w)
{
    struct part *pt = (struct part *)((char *)w - offsetof(struct part, work));
    struct split_wait *sw = pt->wait;

    part_main(pt);
    pthread_mutex_lock(&sw->lock);
    if (--sw->pending == 0)
        pthread_cond_signal(&sw->cond);
    pthread_mutex_unlock(&sw->lock);
}

/* Hands pt to a free thread of c->parts, counted in w; false when none is
 * free (the caller runs it). */
static bool part_hand_over(struct moed_cluster *c, struct part *pt, struct split_wait *w)
{
    pt->wait = w;
    pt->work.run = part_run;
    /* Counted first: the part may be done before the post returns. */
    pthread_mutex_lock(&w->lock);
    w->pending++;
    pthread_mutex_unlock(&w->lock);
    if (moed_cl_pool_post(&c->parts, &pt->work) == 0)
        return true;
    pthread_mutex_lock(&w->lock);
    w->pending--;
    pthread_mutex_unlock(&w->lock);
    return false;
}

/* The split forward of one request: returns 0 or -errno with err, and
 * fills r's stats and out. */
static int split_forward(struct moed_cluster *c, struct moed_model *mm, struct moe_sched_req *r,
                         struct moe_error *err)
{
    struct moed *d = c->d;
    const int T = r->a.n_tokens, H = mm->m->cfg.hidden, K = mm->m->cfg.top_k, layer = r->a.layer;
    const size_t TK = (size_t)T * (size_t)K;
    struct view v;
    struct mstate *s;
    struct part parts[MAX_MEMBERS];
    struct split_wait wait = {.pending = 0};
    bool waiting = false;
    int32_t *ids = malloc(TK * sizeof(*ids)), *to = malloc(TK * sizeof(*to)), *lids = NULL;
    float *w = malloc(TK * sizeof(*w));
    uint64_t t0 = moe_now_ns();
    bool remote = false;
    int rc = 0;
    static _Atomic uint32_t salt;
    uint32_t sl = atomic_fetch_add_explicit(&salt, 1, memory_order_relaxed);

    memset(parts, 0, sizeof(parts));
    moed_cl_view_get(c, &v);
    if (!ids || !to || !w) {
        rc = moe_error_set(err, -ENOMEM, "out of memory for %d tokens", T);
        goto out;
    }
    if (r->a.ids) {
        memcpy(ids, r->a.ids, TK * sizeof(*ids));
        memcpy(w, r->a.weights, TK * sizeof(*w));
    } else {
        rc = moe_layer_route(mm->e, layer, r->a.x, T, ids, w, err);
        if (rc < 0)
            goto out;
    }
    pthread_mutex_lock(&c->lock);
    s = moed_cl_mstate_get(c, mm);
    pthread_mutex_unlock(&c->lock);
    for (size_t i = 0; i < TK; i++) {
        if (s && ids[i] >= 0 && ids[i] < s->n_experts)
            atomic_fetch_add_explicit(&s->load[(size_t)layer * s->n_experts + ids[i]], 1,
                                      memory_order_relaxed);
        to[i] = moed_cl_pick(c, &v, s, layer, ids[i], sl + (uint32_t)(i / (size_t)K), -1);
        remote |= to[i] != v.self;
    }
    if (!remote) {
        /* Everything here: the whole layer, bit for bit as on one node. */
        rc = run_local(d, mm, layer, r->a.x, T, ids, w, 0, r->a.out, r, err);
        goto out;
    }
    atomic_fetch_add_explicit(&c->forwards, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&c->tokens_total, (uint64_t)T, memory_order_relaxed);
    /* The whole routing to the predictor (the local share below is partial
     * and teaches it nothing), which prefetches the next layer's experts
     * that this node holds (the mask set at each rebalance). */
    moe_cache_observe(d->cache, mm->cache_id, layer, ids, T, K);
    /* One part per remote member: the rows that have a slot for it. */
    for (int m = 0; m < v.n; m++) {
        struct part *pt = &parts[m];
        int rows = 0;

        if (m == v.self)
            continue;
        for (int t = 0; t < T; t++)
            for (int k = 0; k < K; k++)
                if (to[(size_t)t * K + k] == m) {
                    rows++;
                    break;
                }
        if (!rows)
            continue;
        *pt = (struct part){.c = c,
                            .mm = mm,
                            .v = &v,
                            .s = s,
                            .member = m,
                            .layer = layer,
                            .H = H,
                            .K = K,
                            .rows = rows};
        pt->row = malloc((size_t)rows * sizeof(*pt->row));
        pt->x = malloc((size_t)rows * H * sizeof(float));
        pt->ids = malloc((size_t)rows * K * sizeof(int32_t));
        pt->w = malloc((size_t)rows * K * sizeof(float));
        pt->out = calloc((size_t)rows * H, sizeof(float));
        if (!pt->row || !pt->x || !pt->ids || !pt->w || !pt->out) {
            rc = moe_error_set(err, -ENOMEM, "out of memory for %d tokens", T);
            goto out;
        }
        rows = 0;
        for (int t = 0; t < T; t++) {
            bool mine = false;

            for (int k = 0; k < K; k++)
                mine |= to[(size_t)t * K + k] == m;
            if (!mine)
                continue;
            pt->row[rows] = t;
            memcpy(pt->x + (size_t)rows * H, r->a.x + (size_t)t * H, (size_t)H * sizeof(float));
            for (int k = 0; k < K; k++) {
                size_t i = (size_t)t * K + k;

                pt->ids[(size_t)rows * K + k] = to[i] == m ? ids[i] : -1;
                pt->w[(size_t)rows * K + k] = w[i];
            }
            rows++;
        }
    }
    pthread_mutex_init(&wait.lock, NULL);
    pthread_cond_init(&wait.cond, NULL);
    waiting = true;
    for (int m = 0; m < v.n; m++)
        if (parts[m].rows && !part_hand_over(c, &parts[m], &wait))
            part_main(&parts[m]); /* no thread free: here, now */
    /* This node's share, with the shared experts, meanwhile. */
    lids = malloc(TK * sizeof(*lids));
    if (!lids)
        rc = moe_error_set(err, -ENOMEM, "out of memory");
    for (size_t i = 0; lids && i < TK; i++)
        lids[i] = to[i] == v.self ? ids[i] : -1;
    if (lids)
        rc = run_local(d, mm, layer, r->a.x, T, lids, w, MOE_FWD_PARTIAL, r->a.out, r, err);
    pthread_mutex_lock(&wait.lock);
    while (wait.pending)
        pthread_cond_wait(&wait.cond, &wait.lock);
    pthread_mutex_unlock(&wait.lock);
    /* Combine in member order, so that the sums do not depend on timing. */
    for (int m = 0; m < v.n && rc == 0; m++) {
        const struct part *pt = &parts[m];

        if (!pt->rows)
            continue;
        if (pt->status < 0) {
            rc = moe_error_set(err, pt->status, "%s", pt->msg);
            break;
        }
        for (int i = 0; i < pt->rows; i++) {
            float *o = r->a.out + (size_t)pt->row[i] * H;
            const float *y = pt->out + (size_t)i * H;

            for (int h = 0; h < H; h++)
                o[h] += y[h];
        }
        r->st.hits += pt->hits;
        r->st.misses += pt->misses;
    }
    r->st.route_ns = moe_now_ns() - t0 - r->st.compute_ns - r->st.load_ns;
out:
    if (waiting) {
        pthread_cond_destroy(&wait.cond);
        pthread_mutex_destroy(&wait.lock);
    }
    for (int m = 0; m < MAX_MEMBERS; m++)
        part_clear(&parts[m]);
    moed_cl_view_put(c, &v);
    if (r->a.ret_ids && rc == 0)
        memcpy(r->a.ret_ids, ids, TK * sizeof(*ids));
    if (r->a.ret_weights && rc == 0)
        memcpy(r->a.ret_weights, w, TK * sizeof(*w));
    free(ids);
    free(to);
    free(w);
    free(lids);
    return rc;
}

/* One split forward's run on a thread of c->split.q.  Its slot goes back to
 * the pool before the caller is answered: a caller that sends its next
 * forward on the answer finds the slot free (max_split_forwards counts the
 * forwards being computed, not the ones already answered). */
static void split_run(struct cl_work *w)
{
    struct job *j = (struct job *)((char *)w - offsetof(struct job, work));
    struct moed_cluster *c = cl_of(j->d);
    struct split_pool *p = &c->split;
    struct moe_error err = {0};
    struct moe_sched_req *r = j->r;
    uint64_t t0 = moe_now_ns(), waited = t0 - j->t_queued; /* for a thread */
    int rc;

    memset(&r->st, 0, sizeof(r->st));
    r->queue_ns = 0;
    rc = split_forward(c, j->mm, r, &err);
    if (r->queue_ns == 0)
        r->queue_ns = moe_now_ns() - t0 - r->st.compute_ns - r->st.load_ns - r->st.route_ns;
    r->queue_ns += waited;
    pthread_mutex_lock(&p->lock);
    j->next = p->free;
    p->free = j;
    p->in_flight--;
    pthread_mutex_unlock(&p->lock);
    r->done(r, rc, rc < 0 ? err.msg : NULL);
    atomic_fetch_sub(&c->in_flight, 1); /* moed_cluster_stop waits for it */
}

int moed_cl_split_pool_init(struct moed_cluster *c, int cap, struct moe_error *err)
{
    struct split_pool *p = &c->split;

    p->cap = cap > 0 ? cap : MOED_SPLIT_FORWARDS_DEFAULT;
    p->jobs = calloc((size_t)p->cap, sizeof(*p->jobs));
    /* At most one thread per job, so a job never waits for a thread. */
    if (!p->jobs || moed_cl_pool_init(&p->q, p->cap, p->cap) < 0) {
        free(p->jobs);
        return moe_error_set(err, -ENOMEM, "out of memory");
    }
    for (int i = 0; i < p->cap; i++) {
        p->jobs[i].next = p->free;
        p->free = &p->jobs[i];
    }
    pthread_mutex_init(&p->lock, NULL);
    p->inited = true;
    return 0;
}

/* Ends the pool's threads once the queue is empty. */
void moed_cl_split_pool_free(struct moed_cluster *c)
{
    struct split_pool *p = &c->split;

    if (!p->inited)
        return;
    moed_cl_pool_free(&p->q);
    pthread_mutex_destroy(&p->lock);
    free(p->jobs);
}

int moed_submit(struct moed *d, struct moed_model *mm, struct moe_sched_req *r,
                struct moe_error *err)
{
    struct moed_cluster *c = cl_of(d);
    struct split_pool *p;
    struct job *j;
    int n;

    if (!c)
        return moe_sched_submit(d->sched, r, err);
    pthread_mutex_lock(&c->lock);
    n = c->n_peers;
    pthread_mutex_unlock(&c->lock);
    if (n == 0 || r->a.flags)
        return moe_sched_submit(d->sched, r, err);
    p = &c->split;
    pthread_mutex_lock(&p->lock);
    j = p->free;
    if (!j) {
        pthread_mutex_unlock(&p->lock);
        return moe_error_set(err, -ENOBUFS,
                             "node %s has %d split forwards in flight, the most [cluster] "
                             "max_split_forwards allows: try again, or raise it",
                             c->node, p->cap);
    }
    p->free = j->next;
    p->in_flight++;
    pthread_mutex_unlock(&p->lock);
    *j = (struct job){.d = d, .mm = mm, .r = r, .t_queued = moe_now_ns()};
    j->work.run = split_run;
    atomic_fetch_add(&c->in_flight, 1);
    if (moed_cl_pool_post(&p->q, &j->work) < 0) {
        /* No thread at all: this node computes it all, which is always
         * right (it pages in what it lacks). */
        pthread_mutex_lock(&p->lock);
        j->next = p->free;
        p->free = j;
        p->in_flight--;
        pthread_mutex_unlock(&p->lock);
        atomic_fetch_sub(&c->in_flight, 1);
        return moe_sched_submit(d->sched, r, err);
    }
    return 0;
}
