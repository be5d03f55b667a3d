/*
 * Several moed nodes as one expert pool: membership, health, placement,
 * the split forward and its failover, and the moe.v1.Peer service
 * (cluster.h says how they work together).
 */
#include "cluster.h"
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

#define MAX_MEMBERS (MOED_MAX_PEERS + 1)
#define IDLE_CLIENTS 16

enum peer_state { PEER_DOWN = 0, PEER_UP, PEER_REFUSED };
static const char *const state_names[] = {"down", "up", "refused"};

struct moe_nccl;

/*
 * The NCCL transport with one peer: two communicators of two ranks, one
 * per direction of forwards.  `out` carries the forwards this node sends
 * (it made it: rank 0, the peer rank 1), `in` those the peer sends.  On
 * each, one forward at a time, in the sender's order: the sender posts the
 * token rows, then calls ForwardExperts with (generation, seq) and no data;
 * the receiver takes the rows in seq order, computes, posts the output and
 * answers; the sender then takes the output.  Each direction has its own
 * communicator and stream, so that two nodes sending to each other never
 * wait on each other.  Any failure aborts the communicator (a dead peer
 * never hangs a stream) and the forward goes over gRPC; the sender makes a
 * new communicator (a new generation) after a pause.
 */
struct nccl_link {
    pthread_mutex_t out_lock; /* held across one outgoing forward */
    struct moe_nccl *out;
    /* Generations start at the clock in ns, so that a restarted sender's
     * are newer than those the peer saw before (unless the clock stepped
     * back: then its joins are dropped as stale until it catches up, or a
     * peer remove/add on the other node). */
    uint64_t out_gen, out_seq, retry_ns;
    int fails;               /* tries failed in a row: the pause doubles */
    _Atomic bool out_ready;  /* out is there (read without out_lock) */
    pthread_mutex_t in_lock; /* in, in_gen, in_seq, joining */
    pthread_cond_t in_cond;
    struct moe_nccl *in;
    uint64_t in_gen, in_seq; /* the last transfer taken */
    uint64_t in_post_ns;     /* when the last output was posted on in */
    bool joining;
    char remote[96];  /* the peer's NCCL, from its pings (peer lock) */
    char failed[200]; /* why the last try failed, "" once it works (peer lock) */
    _Atomic uint64_t calls, served, bytes;
};

#ifdef MOED_HAVE_NCCL
static void nccl_close_async(struct moe_nccl *comm);
#endif

struct peer {
    char *name, *address;
    int refs;     /* views and calls using it; guarded by the cluster's lock */
    bool removed; /* no longer a member; freed when refs drops to 0 */
    _Atomic int state;
    struct moe_rpc_client_config cfg;
    pthread_mutex_t lock; /* idle, last_error */
    struct moe_rpc_client *idle[IDLE_CLIENTS];
    int n_idle;
    char last_error[200];
    /* Its hot experts, from its last answer to a ping (lock). */
    int n_hot;
    struct peer_hot {
        char model[128];
        uint32_t *experts;
        size_t n;
    } * hot;
    /* Relaxed counters: statistics read on their own. */
    _Atomic uint64_t rtt_ns, pings_failed, calls, calls_failed, tokens_sent, bytes_sent,
        bytes_received;
    struct nccl_link nl;
};

/* What this node measures and holds of one model. */
struct mstate {
    char name[128];
    int n_layers, n_experts;
    _Atomic uint32_t *load; /* [layer * E + expert]: token rows routed through here */
    uint8_t *hot;           /* measured hot here (guarded by the cluster's lock) */
    /* Hot here or at any peer that is up: replicated.  Written by the health
     * thread under the lock, read by requests without it: relaxed atomics
     * (a request may see the old or the new value of a byte, both valid). */
    _Atomic uint8_t *hot_all;
    uint8_t *held; /* this node held it under the last map it applied */
    uint8_t *drop; /* to evict at the next rebalance */
    struct mstate *next;
};

/* A split forward waiting for, or running on, a thread of the pool. */
struct job {
    struct moed *d;
    struct moed_model *mm;
    struct moe_sched_req *r; /* the caller's */
    uint64_t t_queued;
    struct job *next; /* in the queue or the free list */
};

/* The threads split forwards run on: started as needed, at most one per
 * job, kept until the cluster stops.  jobs[cap] bounds the split forwards
 * in flight (queued or running); beyond it moed_submit refuses. */
struct split_pool {
    pthread_mutex_t lock; /* everything below */
    pthread_cond_t cond;  /* a job queued, or stopping */
    struct job *jobs;     /* [cap] */
    struct job *free;     /* jobs not in flight */
    struct job *head, *tail; /* queued, oldest first */
    pthread_t *threads;      /* [cap], n_threads started */
    int cap, n_threads, idle, in_flight;
    bool stopping, inited;
};

/* A split forward's wait for its parts on the part pool. */
struct split_wait {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int pending; /* parts handed over, not finished */
};

struct part;

/* The threads the parts of split forwards (calls to peers) run on:
 * started as needed up to PART_THREADS, kept until the cluster stops.  A
 * part that finds no thread free runs on its split forward's own thread,
 * so a split forward never waits for another's parts. */
#define PART_THREADS 64
struct part_pool {
    pthread_mutex_t lock;     /* everything below */
    pthread_cond_t cond;      /* a part queued, or stopping */
    struct part *head, *tail; /* queued, at most as many as idle threads */
    pthread_t threads[PART_THREADS];
    int n_threads, idle, queued;
    bool stopping, inited;
};

struct moed_cluster {
    struct moed *d;
    char node[128];
    pthread_mutex_t lock; /* peers, models' hot sets, version */
    pthread_cond_t cond;  /* wakes the health thread */
    struct peer *peers[MOED_MAX_PEERS];
    int n_peers;
    struct mstate *models;
    uint64_t version;
    bool stopping, kick;
    pthread_t thread;
    bool started;
    _Atomic int in_flight; /* split forwards and NCCL transfers served, running */
    struct split_pool split;
    struct part_pool parts;
    _Atomic uint64_t forwards, remote_calls, failovers, failover_local, tokens_remote, tokens_total,
        bytes_sent, bytes_received, served, nccl_fallbacks, strays_evicted;
    /* NCCL here: usable (built, on, a device), on which device, and what
     * this node tells its peers, or why not. */
    bool nccl_ok;
    int nccl_dev;
    char nccl_desc[96], nccl_why[200];
    _Atomic int nccl_joins; /* join threads running */
};

/* A consistent picture of the members for one request: sorted names,
 * peers referenced (NULL for this node). */
struct view {
    int n;
    int self;
    struct peer *peer[MAX_MEMBERS];
    const char *name[MAX_MEMBERS];
    uint64_t version;
};

static struct moed_cluster *cl_of(struct moed *d)
{
    return d->cluster;
}

/* ---- peers ----------------------------------------------------------------------------- */

static void peer_hot_clear(struct peer *p)
{
    for (int i = 0; i < p->n_hot; i++)
        free(p->hot[i].experts);
    free(p->hot);
    p->hot = NULL;
    p->n_hot = 0;
}

static void nccl_link_close(struct nccl_link *l);

static void peer_free(struct peer *p)
{
    nccl_link_close(&p->nl);
    pthread_mutex_destroy(&p->nl.out_lock);
    pthread_mutex_destroy(&p->nl.in_lock);
    pthread_cond_destroy(&p->nl.in_cond);
    peer_hot_clear(p);
    for (int i = 0; i < p->n_idle; i++)
        moe_rpc_client_close(p->idle[i]);
    pthread_mutex_destroy(&p->lock);
    free((char *)p->cfg.target);
    free(p->name);
    free(p->address);
    free(p);
}

static struct peer *peer_new(struct moed *d, const char *name, const char *address)
{
    struct peer *p = calloc(1, sizeof(*p));

    if (!p)
        return NULL;
    p->name = strdup(name);
    p->address = strdup(address);
    p->cfg.target = strdup(address);
    if (!p->name || !p->address || !p->cfg.target) {
        free(p->name);
        free(p->address);
        free((char *)p->cfg.target);
        free(p);
        return NULL;
    }
    /* The control plane's settings: its token, and its certificate as the
     * client's, trusting the CA that signs clients (one PKI per cluster). */
    p->cfg.token = d->cfg.token;
    p->cfg.tls = d->cfg.tls_cert != NULL;
    p->cfg.tls_ca = d->cfg.tls_client_ca;
    p->cfg.tls_cert = d->cfg.tls_cert;
    p->cfg.tls_key = d->cfg.tls_key;
    p->cfg.timeout_ms = (int)MOE_MIN(d->cfg.peer_timeout_ms, INT32_MAX);
    pthread_mutex_init(&p->lock, NULL);
    pthread_mutex_init(&p->nl.out_lock, NULL);
    {
        struct timespec now;

        clock_gettime(CLOCK_REALTIME, &now);
        p->nl.out_gen = (uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec;
    }
    pthread_mutex_init(&p->nl.in_lock, NULL);
    pthread_cond_init(&p->nl.in_cond, NULL);
    atomic_store(&p->state, PEER_DOWN); /* until it answers a ping */
    return p;
}

static void peer_put(struct moed_cluster *c, struct peer *p)
{
    bool gone;

    pthread_mutex_lock(&c->lock);
    gone = --p->refs == 0 && p->removed;
    pthread_mutex_unlock(&c->lock);
    if (gone)
        peer_free(p);
}

/* A client of p for one call (from the idle ones, or a new one). */
static struct moe_rpc_client *client_get(struct peer *p, int timeout_ms, char *msg, size_t len)
{
    struct moe_rpc_client *cl = NULL;
    struct moe_rpc_client_config cfg = p->cfg;

    pthread_mutex_lock(&p->lock);
    if (timeout_ms == 0 && p->n_idle)
        cl = p->idle[--p->n_idle];
    pthread_mutex_unlock(&p->lock);
    if (cl)
        return cl;
    if (timeout_ms)
        cfg.timeout_ms = timeout_ms;
    if (moe_rpc_client_open(&cfg, &cl, msg, len) < 0)
        return NULL;
    return cl;
}

static void client_put(struct peer *p, struct moe_rpc_client *cl, bool keep)
{
    if (keep) {
        pthread_mutex_lock(&p->lock);
        if (p->n_idle < IDLE_CLIENTS) {
            p->idle[p->n_idle++] = cl;
            cl = NULL;
        }
        pthread_mutex_unlock(&p->lock);
    }
    moe_rpc_client_close(cl);
}

static void set_error(struct peer *p, const char *msg)
{
    pthread_mutex_lock(&p->lock);
    snprintf(p->last_error, sizeof(p->last_error), "%.199s", msg);
    pthread_mutex_unlock(&p->lock);
}

static int cmp_names(const void *a, const void *b)
{
    const char *const *x = a, *const *y = b;

    return strcmp(*x, *y);
}

/* Takes a view of the members (refs on the peers); view_put gives it back. */
static void view_get(struct moed_cluster *c, struct view *v)
{
    const char *names[MAX_MEMBERS];

    pthread_mutex_lock(&c->lock);
    v->n = 0;
    names[v->n++] = c->node;
    for (int i = 0; i < c->n_peers; i++)
        names[v->n++] = c->peers[i]->name;
    qsort(names, (size_t)v->n, sizeof(*names), cmp_names);
    for (int i = 0; i < v->n; i++) {
        v->name[i] = names[i];
        v->peer[i] = NULL;
        if (names[i] == c->node) {
            v->self = i;
            continue;
        }
        for (int k = 0; k < c->n_peers; k++)
            if (c->peers[k]->name == names[i]) {
                v->peer[i] = c->peers[k];
                c->peers[k]->refs++;
            }
    }
    v->version = c->version;
    pthread_mutex_unlock(&c->lock);
}

static void view_put(struct moed_cluster *c, struct view *v)
{
    for (int i = 0; i < v->n; i++)
        if (v->peer[i])
            peer_put(c, v->peer[i]);
    v->n = 0;
}

static bool member_up(const struct view *v, int i)
{
    return i == v->self ||
           atomic_load_explicit(&v->peer[i]->state, memory_order_relaxed) == PEER_UP;
}

/* ---- placement ------------------------------------------------------------------------- */

/* The model's state here, made on first use (lock held). */
static struct mstate *mstate_get(struct moed_cluster *c, const struct moed_model *mm)
{
    const struct moe_model_config *mc = &mm->m->cfg;
    struct mstate *s;
    size_t n = (size_t)mc->n_layers * (size_t)mc->n_experts;

    for (s = c->models; s; s = s->next)
        if (strcmp(s->name, mm->name) == 0 && s->n_layers == mc->n_layers &&
            s->n_experts == mc->n_experts)
            return s;
    s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->load = calloc(n, sizeof(*s->load));
    s->hot = calloc(n, 1);
    s->hot_all = calloc(n, 1);
    s->held = calloc(n, 1);
    s->drop = calloc(n, 1);
    if (!s->load || !s->hot || !s->hot_all || !s->held || !s->drop) {
        free(s->load);
        free(s->hot);
        free((void *)s->hot_all);
        free(s->held);
        free(s->drop);
        free(s);
        return NULL;
    }
    snprintf(s->name, sizeof(s->name), "%s", mm->name);
    s->n_layers = mc->n_layers;
    s->n_experts = mc->n_experts;
    s->next = c->models;
    c->models = s;
    return s;
}

/* Holders of (layer, expert) among the view's members, owner first
 * (placement.h).  Returns how many. */
static int holders(const struct moed_cluster *c, const struct view *v, const struct mstate *s,
                   int layer, int expert, int *ret)
{
    bool hot = s && atomic_load_explicit(&s->hot_all[(size_t)layer * s->n_experts + expert],
                                         memory_order_relaxed);

    return moed_placement_holders(v->n, layer, expert, hot, c->d->cfg.replicas, ret);
}

static bool view_member_up(const void *v, int m)
{
    return member_up(v, m);
}

/* The member to send (layer, expert) to: a holder that is up (spread by
 * salt), else this node, which pages it in itself. */
static int pick(const struct moed_cluster *c, const struct view *v, const struct mstate *s,
                int layer, int expert, uint32_t salt, int not )
{
    int h[MAX_MEMBERS], n = holders(c, v, s, layer, expert, h);

    return moed_placement_pick(h, n, salt, not, view_member_up, v, v->self);
}

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
    struct part *next;       /* in the pool's queue */
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
    cl = buf ? client_get(p, 0, msg, sizeof(msg)) : NULL;
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
    client_put(p, cl, st == GRPC_STATUS_OK);
    if (st != GRPC_STATUS_OK) {
        snprintf(pt->msg, sizeof(pt->msg), "%.40s: %.200s", p->name, msg);
        set_error(p, msg);
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
        nccl_close_async(l->out);
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
            to[i] = pick(c, pt->v, pt->s, pt->layer, pt->ids[i], (uint32_t)i, pt->member);
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

static void *part_thread(void *arg)
{
    struct part_pool *p = arg;

    pthread_mutex_lock(&p->lock);
    for (;;) {
        struct part *pt = p->head;

        if (!pt) {
            if (p->stopping)
                break;
            p->idle++;
            pthread_cond_wait(&p->cond, &p->lock);
            p->idle--;
            continue;
        }
        p->head = pt->next;
        if (!p->head)
            p->tail = NULL;
        p->queued--;
        pthread_mutex_unlock(&p->lock);
        part_main(pt);
        pthread_mutex_lock(&pt->wait->lock);
        if (--pt->wait->pending == 0)
            pthread_cond_signal(&pt->wait->cond);
        pthread_mutex_unlock(&pt->wait->lock);
        pthread_mutex_lock(&p->lock);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

/* Hands pt to a free thread of the pool (started if need be), counted in
 * w; false when none is free (the caller runs it). */
static bool part_hand_over(struct moed_cluster *c, struct part *pt, struct split_wait *w)
{
    struct part_pool *p = &c->parts;
    bool ok = true;

    pthread_mutex_lock(&p->lock);
    if (p->idle <= p->queued) {
        ok = p->n_threads < PART_THREADS &&
             pthread_create(&p->threads[p->n_threads], NULL, part_thread, p) == 0;
        if (ok)
            p->n_threads++;
    }
    if (ok) {
        pt->wait = w;
        pt->next = NULL;
        pthread_mutex_lock(&w->lock);
        w->pending++;
        pthread_mutex_unlock(&w->lock);
        if (p->tail)
            p->tail->next = pt;
        else
            p->head = pt;
        p->tail = pt;
        p->queued++;
        pthread_cond_signal(&p->cond);
    }
    pthread_mutex_unlock(&p->lock);
    return ok;
}

static void part_pool_init(struct moed_cluster *c)
{
    pthread_mutex_init(&c->parts.lock, NULL);
    pthread_cond_init(&c->parts.cond, NULL);
    c->parts.inited = true;
}

/* Ends the pool's threads (no split forward is running). */
static void part_pool_free(struct moed_cluster *c)
{
    struct part_pool *p = &c->parts;

    if (!p->inited)
        return;
    pthread_mutex_lock(&p->lock);
    p->stopping = true;
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->lock);
    for (int i = 0; i < p->n_threads; i++)
        pthread_join(p->threads[i], NULL);
    pthread_cond_destroy(&p->cond);
    pthread_mutex_destroy(&p->lock);
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
    view_get(c, &v);
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
    s = mstate_get(c, mm);
    pthread_mutex_unlock(&c->lock);
    for (size_t i = 0; i < TK; i++) {
        if (s && ids[i] >= 0 && ids[i] < s->n_experts)
            atomic_fetch_add_explicit(&s->load[(size_t)layer * s->n_experts + ids[i]], 1,
                                      memory_order_relaxed);
        to[i] = pick(c, &v, s, layer, ids[i], sl + (uint32_t)(i / (size_t)K), -1);
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
    view_put(c, &v);
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

/* One split forward's run on a thread of the pool. */
static void run_job(struct moed_cluster *c, struct job *j)
{
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
    r->done(r, rc, rc < 0 ? err.msg : NULL);
}

static void *split_main(void *arg)
{
    struct moed_cluster *c = arg;
    struct split_pool *p = &c->split;

    pthread_mutex_lock(&p->lock);
    for (;;) {
        struct job *j = p->head;

        if (!j) {
            if (p->stopping)
                break;
            p->idle++;
            pthread_cond_wait(&p->cond, &p->lock);
            p->idle--;
            continue;
        }
        p->head = j->next;
        if (!p->head)
            p->tail = NULL;
        pthread_mutex_unlock(&p->lock);
        run_job(c, j);
        pthread_mutex_lock(&p->lock);
        j->next = p->free;
        p->free = j;
        p->in_flight--;
        atomic_fetch_sub(&c->in_flight, 1);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

static int split_pool_init(struct moed_cluster *c, int cap, struct moe_error *err)
{
    struct split_pool *p = &c->split;

    p->cap = cap > 0 ? cap : MOED_SPLIT_FORWARDS_DEFAULT;
    p->jobs = calloc((size_t)p->cap, sizeof(*p->jobs));
    p->threads = calloc((size_t)p->cap, sizeof(*p->threads));
    if (!p->jobs || !p->threads) {
        free(p->jobs);
        free(p->threads);
        return moe_error_set(err, -ENOMEM, "out of memory");
    }
    for (int i = 0; i < p->cap; i++) {
        p->jobs[i].next = p->free;
        p->free = &p->jobs[i];
    }
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->cond, NULL);
    p->inited = true;
    return 0;
}

/* Ends the pool's threads once the queue is empty. */
static void split_pool_free(struct moed_cluster *c)
{
    struct split_pool *p = &c->split;

    if (!p->inited)
        return;
    pthread_mutex_lock(&p->lock);
    p->stopping = true;
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->lock);
    for (int i = 0; i < p->n_threads; i++)
        pthread_join(p->threads[i], NULL);
    pthread_cond_destroy(&p->cond);
    pthread_mutex_destroy(&p->lock);
    free(p->jobs);
    free(p->threads);
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
    /* A thread more when none is idle: started once, kept until the
     * cluster stops, at most one per job. */
    if (p->idle == 0 && p->n_threads < p->cap &&
        pthread_create(&p->threads[p->n_threads], NULL, split_main, c) == 0)
        p->n_threads++;
    if (p->n_threads == 0) {
        /* No thread at all: this node computes it all, which is always
         * right (it pages in what it lacks). */
        pthread_mutex_unlock(&p->lock);
        return moe_sched_submit(d->sched, r, err);
    }
    p->free = j->next;
    *j = (struct job){.d = d, .mm = mm, .r = r, .t_queued = moe_now_ns()};
    if (p->tail)
        p->tail->next = j;
    else
        p->head = j;
    p->tail = j;
    p->in_flight++;
    atomic_fetch_add(&c->in_flight, 1);
    pthread_cond_signal(&p->cond);
    pthread_mutex_unlock(&p->lock);
    return 0;
}

/* ---- the NCCL transport's communicators ------------------------------------------------- */

#ifdef MOED_HAVE_NCCL
static _Atomic int nccl_closing; /* communicators being closed on threads of their own */

static void *nccl_close_main(void *arg)
{
    moe_nccl_close(arg);
    atomic_fetch_sub(&nccl_closing, 1);
    return NULL;
}

/* Closes comm on a thread of its own: its abort frees memory, which may
 * wait for every kernel on the device, among them another communicator's
 * that only its own close would stop; nobody waits for that here. */
static void nccl_close_async(struct moe_nccl *comm)
{
    pthread_t t;

    if (!comm)
        return;
    atomic_fetch_add(&nccl_closing, 1);
    if (pthread_create(&t, NULL, nccl_close_main, comm) == 0) {
        pthread_detach(t);
        return;
    }
    atomic_fetch_sub(&nccl_closing, 1);
    moe_nccl_close(comm);
}
#endif

static void nccl_link_close(struct nccl_link *l)
{
#ifdef MOED_HAVE_NCCL
    nccl_close_async(l->out);
    nccl_close_async(l->in);
#endif
    l->out = l->in = NULL;
}

/* What PeerInfo.nccl says of the link to p. */
static void nccl_state(const struct moed_cluster *c, struct peer *p, char *buf, size_t len)
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
/* NCCL joins wait at most this long for the other rank. */
#define NCCL_JOIN_MS 20000

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
    cl = rc == 0 ? client_get(p, 0, err.msg, sizeof(err.msg)) : NULL;
    if (rc == 0 && !cl)
        rc = -EIO;
    if (rc == 0) {
        int st = moe_rpc_client_call(cl, "/moe.v1.Peer/NcclConnect", buf,
                                     moe__v1__nccl_connect_request__pack(&q, buf), &ans, &alen,
                                     err.msg, sizeof(err.msg));

        client_put(p, cl, st == GRPC_STATUS_OK);
        free(ans);
        rc = st == GRPC_STATUS_OK ? 0 : -EIO;
    }
    if (rc == 0)
        rc = moe_nccl_open(j->id, 2, 0, c->nccl_dev, NCCL_JOIN_MS, &comm, &err);
    pthread_mutex_lock(&l->out_lock);
    if (j->gen == l->out_gen) {
        nccl_close_async(l->out);
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
    nccl_close_async(comm); /* a newer try went on meanwhile */
    pthread_mutex_lock(&p->lock);
    snprintf(l->failed, sizeof(l->failed), "%.199s", rc < 0 ? err.msg : "");
    pthread_mutex_unlock(&p->lock);
    if (rc == 0)
        moe_log(MOE_LOG_INFO, "cluster: NCCL to %s ready (generation %llu)", p->name,
                (unsigned long long)j->gen);
    else
        moe_log(MOE_LOG_WARN, "cluster: NCCL to %s: %s; gRPC meanwhile", p->name, err.msg);
    peer_put(c, p);
    free(j);
    atomic_fetch_sub(&c->nccl_joins, 1);
    return NULL;
}

/* After a ping: starts making the outgoing communicator to p when both
 * ends have NCCL, p is up and none is there or being made. */
static void nccl_maybe_connect(struct moed_cluster *c, struct peer *p)
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
            nccl_close_async(l->in);
            l->in = NULL;
        }
        pthread_mutex_unlock(&l->in_lock);
    }
    if (atomic_load(&p->state) != PEER_UP) {
        /* Down: its communicator goes now, not at the next forward's
         * timeout (unless a forward is on it: that one fails over). */
        if (pthread_mutex_trylock(&l->out_lock) == 0) {
            nccl_close_async(l->out);
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
        peer_put(c, p);
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
    nccl_close_async(old);
    rc = moe_nccl_open(j->id, 2, 1, c->nccl_dev, NCCL_JOIN_MS, &comm, &err);
    pthread_mutex_lock(&l->in_lock);
    if (l->in_gen == j->gen) {
        l->in = comm;
        l->joining = false;
        comm = NULL;
    }
    pthread_cond_broadcast(&l->in_cond);
    pthread_mutex_unlock(&l->in_lock);
    nccl_close_async(comm); /* superseded by a newer generation */
    if (rc < 0)
        moe_log(MOE_LOG_WARN, "cluster: NCCL from %s: %s", j->p->name, err.msg);
out:
    peer_put(c, j->p);
    free(j);
    atomic_fetch_sub(&c->nccl_joins, 1);
    return NULL;
}
#endif

/* The peer called name, with a reference (peer_put), or NULL. */
static struct peer *peer_find(struct moed_cluster *c, const char *name)
{
    struct peer *p = NULL;

    pthread_mutex_lock(&c->lock);
    for (int i = 0; i < c->n_peers && !p; i++)
        if (strcmp(c->peers[i]->name, name) == 0) {
            p = c->peers[i];
            p->refs++;
        }
    pthread_mutex_unlock(&c->lock);
    return p;
}

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
    p = c && q->from ? peer_find(c, q->from) : NULL;
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
        peer_put(c, p);
    moe__v1__nccl_connect_request__free_unpacked(q, NULL);
}

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
    peer_hot_clear(p);
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
    cl = client_get(p, (int)MOE_MIN(c->d->cfg.peer_timeout_ms, 1000), msg, sizeof(msg));
    st = cl ? moe_rpc_client_call(cl, "/moe.v1.Peer/Ping", buf, len, &ans, &alen, msg, sizeof(msg))
            : GRPC_STATUS_UNAVAILABLE;
    moe_rpc_client_close(cl);
    if (st == GRPC_STATUS_OK && !take_hot(p, ans, alen)) {
        /* It answers but takes no work (draining or stopping): down for
         * requests, so that none pays a round trip to be refused. */
        st = GRPC_STATUS_UNAVAILABLE;
        snprintf(msg, sizeof(msg), "draining or stopping");
    }
    free(ans);
    if (st == GRPC_STATUS_OK) {
        atomic_store(&p->rtt_ns, moe_now_ns() - t0);
        now = PEER_UP;
        if (was != PEER_UP)
            set_error(p, ""); /* back: what failed before is history (logged) */
    } else {
        atomic_fetch_add_explicit(&p->pings_failed, 1, memory_order_relaxed);
        set_error(p, msg);
        /* A node that does not answer no longer votes for replicas. */
        pthread_mutex_lock(&p->lock);
        peer_hot_clear(p);
        pthread_mutex_unlock(&p->lock);
        now = st == GRPC_STATUS_UNAUTHENTICATED || st == GRPC_STATUS_PERMISSION_DENIED
                  ? PEER_REFUSED
                  : PEER_DOWN;
    }
    atomic_store(&p->state, now);
    if (now != was)
        moe_log(now == PEER_UP ? MOE_LOG_INFO : MOE_LOG_WARN, "cluster: peer %s (%s) is %s%s%s",
                p->name, p->address, state_names[now], now == PEER_UP ? "" : ": ",
                now == PEER_UP ? "" : msg);
}

/* Chooses each model's hot experts again from the decayed load, and pages
 * in what this node newly holds; evicts what it dropped an interval ago. */
static void rebalance(struct moed_cluster *c)
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
    view_get(c, &v);
    pthread_mutex_lock(&d->lock);
    for (int i = 0; i < d->n_models; i++) {
        struct moed_model *mm = d->models[i];
        const struct moe_model *m = mm->m;
        struct mstate *s;

        pthread_mutex_lock(&c->lock);
        s = mstate_get(c, mm);
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
                int h[MAX_MEMBERS], nh = holders(c, &v, s, layer, e, h);
                bool mine = false, up = false;

                for (int j = 0; j < nh; j++) {
                    mine |= h[j] == v.self;
                    up |= member_up(&v, h[j]);
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
    view_put(c, &v);
}

static void *health_main(void *arg)
{
    struct moed_cluster *c = arg;
    struct moed *d = c->d;
    uint64_t next_rebalance = moe_now_ns() + d->cfg.rebalance_interval_ms * 1000000ull;

    for (;;) {
        struct view v;
        struct timespec ts;
        uint64_t ms = d->cfg.ping_interval_ms;

        view_get(c, &v);
        for (int i = 0; i < v.n; i++)
            if (v.peer[i]) {
                ping_one(c, v.peer[i]);
#ifdef MOED_HAVE_NCCL
                nccl_maybe_connect(c, v.peer[i]);
#endif
            }
        view_put(c, &v);
        merge_hot(c);
        bool kicked;

        pthread_mutex_lock(&c->lock);
        kicked = c->kick;
        c->kick = false;
        pthread_mutex_unlock(&c->lock);
        if (moe_now_ns() >= next_rebalance || kicked) {
            rebalance(c);
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

/* ---- membership ------------------------------------------------------------------------ */

static int add_peer(struct moed_cluster *c, const char *name, const char *address,
                    struct moe_error *err)
{
    struct peer *p;

    if (strcmp(name, c->node) == 0)
        return moe_error_set(err, -EINVAL, "peer %s: that is this node's own name", name);
    p = peer_new(c->d, name, address);
    if (!p)
        return moe_error_set(err, -ENOMEM, "out of memory");
    pthread_mutex_lock(&c->lock);
    for (int i = 0; i < c->n_peers; i++)
        if (strcmp(c->peers[i]->name, name) == 0) {
            pthread_mutex_unlock(&c->lock);
            peer_free(p);
            return moe_error_set(err, -EEXIST, "peer %s is a member already", name);
        }
    if (c->n_peers == MOED_MAX_PEERS) {
        pthread_mutex_unlock(&c->lock);
        peer_free(p);
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
    peer_put(c, p);
    moe_log(MOE_LOG_INFO, "cluster: peer %s removed", name);
    return 0;
}

/* Whether this node can use NCCL, and what it tells its peers. */
static void nccl_init(struct moed_cluster *c)
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
    part_pool_init(c);
    rc = split_pool_init(c, d->cfg.max_split_forwards, err);
    if (rc < 0) {
        part_pool_free(c);
        pthread_cond_destroy(&c->cond);
        pthread_mutex_destroy(&c->lock);
        free(c);
        return rc;
    }
    nccl_init(c);
    d->cluster = c;
    for (int i = 0; i < d->cfg.n_peers && rc == 0; i++)
        rc = add_peer(c, d->cfg.peers[i].name, d->cfg.peers[i].address, err);
    if (rc == 0 && pthread_create(&c->thread, NULL, health_main, c) != 0)
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

void moed_cluster_stop(struct moed *d)
{
    struct moed_cluster *c = cl_of(d);

    if (!c)
        return;
    pthread_mutex_lock(&c->lock);
    c->stopping = true;
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->lock);
    if (c->started)
        pthread_join(c->thread, NULL);
    /* Split forwards still running call back into the scheduler, and NCCL
     * joins hold peers: wait (joins give up after NCCL_JOIN_MS). */
    while (atomic_load(&c->in_flight) > 0 || atomic_load(&c->nccl_joins) > 0)
        usleep(1000);
    split_pool_free(c);
    part_pool_free(c);
    for (int i = 0; i < c->n_peers; i++) {
        c->peers[i]->removed = true;
        peer_put(c, c->peers[i]);
    }
#ifdef MOED_HAVE_NCCL
    while (atomic_load(&nccl_closing) > 0) /* the peers' communicators, closing */
        usleep(1000);
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

const char *moed_cluster_node(struct moed *d)
{
    return cl_of(d) ? cl_of(d)->node : "";
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
    view_get(c, &v);
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
        pi->state = (char *)state_names[atomic_load(&p->state)];
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

            nccl_state(c, p, ns, sizeof(ns));
            pi->nccl = strdup(ns);
        }
        pi->nccl_calls = atomic_load(&p->nl.calls);
        pi->nccl_bytes = atomic_load(&p->nl.bytes);
        pi->nccl_served = atomic_load(&p->nl.served);
        out[n++] = pi;
    }
    view_put(c, &v);
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
    k->peer_calls_served = atomic_load(&c->served);
    k->nccl_fallbacks = atomic_load(&c->nccl_fallbacks);
    k->strays_evicted = atomic_load(&c->strays_evicted);
    pthread_mutex_lock(&c->lock);
    k->placement_version = c->version;
    pthread_mutex_unlock(&c->lock);
}

/* ---- moe.v1.Peer ----------------------------------------------------------------------- */

struct pfwd {
    struct moed *d;
    struct moe_rpc_call *call;
    struct moed_model *mm;
    struct moe_sched_req req;
    float *x, *out, *w;
    int32_t *ids;
    int T, H;
    uint64_t t_recv;
    bool out_bf16;  /* answer in bf16 */
    uint16_t *outb; /* the answer's bf16 */
    /* Over NCCL: the sending peer (a reference), generation and transfer. */
    struct peer *np;
    uint64_t ngen, nseq;
};

static void pfwd_free(struct pfwd *f)
{
    if (f->np) {
        struct moed_cluster *c = cl_of(f->d);

        peer_put(c, f->np);
        atomic_fetch_sub(&c->in_flight, 1); /* moed_cluster_stop waits for it */
    }
    if (f->mm)
        moed_model_put(f->d, f->mm);
    free(f->x);
    free(f->out);
    free(f->outb);
    free(f->w);
    free(f->ids);
    free(f);
}

static void pfwd_done(struct moe_sched_req *r, int status, const char *msg)
{
    struct pfwd *f = r->arg;
    Moe__V1__ForwardExpertsResponse a = MOE__V1__FORWARD_EXPERTS_RESPONSE__INIT;
    Moe__V1__Tensor t = MOE__V1__TENSOR__INIT;
    Moe__V1__Timing tm = MOE__V1__TIMING__INIT;
    int64_t shape[2] = {f->T, f->H};
    size_t n = (size_t)f->T * f->H;
    char nmsg[MOE_ERROR_MSG_MAX];

#ifdef MOED_HAVE_NCCL
    if (status >= 0 && f->np) {
        /* The output goes back over the sender's communicator; the answer
         * only says it is there. */
        struct nccl_link *l = &f->np->nl;
        struct moe_error err = {0};
        struct moe_nccl_xfer y = {0, f->out, n * sizeof(float)};

        /* Nobody else is on it in the protocol (the sender waits for this
         * answer): busy means something went wrong; the sender falls back
         * rather than this compute thread waiting. */
        if (pthread_mutex_trylock(&l->in_lock) != 0) {
            status =
                moe_error_set(&err, -EBUSY, "the NCCL communicator from %s is busy", f->np->name);
        } else {
            if (l->in && l->in_gen == f->ngen) {
                status = moe_nccl_post(l->in, &y, 1, NULL, 0, f->d->cfg.peer_timeout_ms, &err);
                l->in_post_ns = moe_now_ns();
                if (status < 0) {
                    nccl_close_async(l->in);
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
#endif
    if (status >= 0) {
        t.n_shape = 2;
        t.shape = shape;
        t.dtype = MOE__V1__DTYPE__DTYPE_F32;
        t.data.data = f->np ? NULL : (uint8_t *)f->out;
        t.data.len = f->np ? 0 : n * sizeof(float);
        if (f->out_bf16 && (f->outb = malloc(n * sizeof(*f->outb)))) {
            for (size_t i = 0; i < n; i++)
                f->outb[i] = moe_f32_to_bf16(f->out[i]);
            t.dtype = MOE__V1__DTYPE__DTYPE_BF16;
            t.data.data = (uint8_t *)f->outb;
            t.data.len = n * sizeof(*f->outb);
        } else if (f->out_bf16) {
            status = -ENOMEM;
            msg = "out of memory";
        }
    }
    if (status < 0) {
        moe_rpc_fail(f->call, moed_grpc_status(status), "%s", msg ? msg : strerror(-status));
    } else {
        tm.queue_ns = r->queue_ns;
        tm.route_ns = r->st.route_ns;
        tm.load_ns = r->st.load_ns;
        tm.compute_ns = r->st.compute_ns;
        tm.total_ns = moe_now_ns() - f->t_recv;
        tm.batch_requests = (uint32_t)r->batch_requests;
        tm.batch_tokens = (uint32_t)r->batch_tokens;
        a.output = &t;
        a.timing = &tm;
        a.cache_hits = (uint32_t)r->st.hits;
        a.cache_misses = (uint32_t)r->st.misses;
        moed_reply_msg(f->call, &a.base);
    }
    atomic_fetch_sub(&f->d->in_flight, 1);
    pfwd_free(f);
}

/* Copies n floats of hidden rows into f->x: false with err where one is
 * not finite. */
static bool hidden_ok(struct pfwd *f, const void *x, size_t n, struct moe_error *err)
{
    if (x != f->x)
        memcpy(f->x, x, n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        if (!isfinite(f->x[i])) {
            moe_error_set(err, -EINVAL, "hidden: row %zu, element %zu is not finite", i / f->H,
                          i % f->H);
            return false;
        }
    return true;
}

#ifdef MOED_HAVE_NCCL
/* Takes a forward's rows over the sender's communicator, in the sender's
 * order, then submits it; pfwd_done sends the output back. */
static void *nccl_take_main(void *arg)
{
    struct pfwd *f = arg;
    struct moed *d = f->d;
    struct nccl_link *l = &f->np->nl;
    struct moe_error err = {0};
    size_t n = (size_t)f->T * f->H;
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
        struct moe_nccl_xfer x = {0, f->x, n * sizeof(float)};

        rc = moe_nccl_exchange(l->in, NULL, 0, &x, 1, tmo, &err);
        if (rc < 0) {
            nccl_close_async(l->in);
            l->in = NULL;
            st = GRPC_STATUS_UNAVAILABLE;
        } else {
            l->in_seq = f->nseq;
        }
    }
    pthread_mutex_unlock(&l->in_lock);
    if (rc == 0 && !hidden_ok(f, f->x, n, &err)) {
        rc = -EINVAL;
        st = GRPC_STATUS_INVALID_ARGUMENT;
    }
    if (rc == 0) {
        atomic_fetch_add_explicit(&l->served, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&l->bytes, 2 * n * sizeof(float), memory_order_relaxed);
        rc = moe_sched_submit(d->sched, &f->req, &err);
        st = moed_grpc_status(rc);
    }
    if (rc < 0) {
        moe_rpc_fail(f->call, st, "%s", err.msg);
        atomic_fetch_sub(&d->in_flight, 1);
        pfwd_free(f);
    }
    return NULL;
}
#endif

void moed_on_forward_experts(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    struct moed *d = arg;
    struct moed_cluster *c = cl_of(d);
    Moe__V1__ForwardExpertsRequest *q = moe__v1__forward_experts_request__unpack(NULL, len, req);
    struct pfwd *f = calloc(1, sizeof(*f));
    struct moe_error err = {0};
    const struct moe_model *m;
    size_t n, tk;
    int st = GRPC_STATUS_INVALID_ARGUMENT;
    bool nccl, hb;

    if (!q || !f) {
        moe_rpc_fail(call, q ? GRPC_STATUS_RESOURCE_EXHAUSTED : GRPC_STATUS_INVALID_ARGUMENT, "%s",
                     q ? "out of memory" : "the request is not a ForwardExpertsRequest");
        goto out;
    }
    f->d = d;
    f->call = call;
    f->t_recv = moe_now_ns();
    if (atomic_load(&d->state) != MOED_SERVING) {
        moe_rpc_fail(call, GRPC_STATUS_UNAVAILABLE, "moed (node %s) is not serving",
                     moed_cluster_node(d));
        goto out;
    }
    f->mm = q->model ? moed_model_get(d, q->model) : NULL;
    if (!f->mm) {
        moe_rpc_fail(call, GRPC_STATUS_NOT_FOUND, "node %s has no model '%s'", moed_cluster_node(d),
                     q->model ? q->model : "");
        goto out;
    }
    m = f->mm->m;
    f->H = m->cfg.hidden;
    if (q->layer >= (uint32_t)m->cfg.n_layers || !m->layers[q->layer].is_moe) {
        moe_rpc_fail(call, st, "model '%s' has no MoE layer %u", q->model, q->layer);
        goto out;
    }
    nccl = q->nccl_seq || q->nccl_generation;
    if (nccl && (!q->nccl_seq || !q->nccl_generation)) {
        moe_rpc_fail(call, st, "nccl_generation %llu, nccl_seq %llu: both or neither",
                     (unsigned long long)q->nccl_generation, (unsigned long long)q->nccl_seq);
        goto out;
    }
    /* bf16 on the wire (peer_bf16) over gRPC; NCCL carries f32. */
    hb = !nccl && q->hidden && q->hidden->dtype == MOE__V1__DTYPE__DTYPE_BF16;
    if (!q->hidden || q->hidden->n_shape != 2 || q->hidden->shape[1] != f->H ||
        q->hidden->shape[0] < 1 || q->hidden->shape[0] > MOE_MAX_TOKENS ||
        (q->hidden->dtype != MOE__V1__DTYPE__DTYPE_F32 && !hb) ||
        q->hidden->data.len != (nccl ? 0 : (size_t)q->hidden->shape[0] * f->H * (hb ? 2 : 4))) {
        moe_rpc_fail(call, st, "hidden: expected float32%s [rows, %d] with 1 to %d rows%s",
                     nccl ? "" : " or bfloat16", f->H, MOE_MAX_TOKENS,
                     nccl ? " and no data (it comes over NCCL)" : "");
        goto out;
    }
    if (q->output_dtype != MOE__V1__DTYPE__DTYPE_UNSPECIFIED &&
        q->output_dtype != MOE__V1__DTYPE__DTYPE_F32 &&
        (q->output_dtype != MOE__V1__DTYPE__DTYPE_BF16 || nccl)) {
        moe_rpc_fail(call, st, "output_dtype %d: expected F32%s", (int)q->output_dtype,
                     nccl ? " over NCCL" : " or BF16");
        goto out;
    }
    f->out_bf16 = q->output_dtype == MOE__V1__DTYPE__DTYPE_BF16;
    f->T = (int)q->hidden->shape[0];
    n = (size_t)f->T * f->H;
    tk = (size_t)f->T * m->cfg.top_k;
    if (q->top_k != (uint32_t)m->cfg.top_k || q->n_expert_ids != tk || q->n_weights != tk) {
        moe_rpc_fail(call, st,
                     "routing: top_k %u with %zu ids and %zu weights: expected top_k %d "
                     "and %zu of each",
                     q->top_k, q->n_expert_ids, q->n_weights, m->cfg.top_k, tk);
        goto out;
    }
    f->x = malloc(n * sizeof(float));
    f->out = malloc(n * sizeof(float));
    f->ids = malloc(tk * sizeof(int32_t));
    f->w = malloc(tk * sizeof(float));
    if (!f->x || !f->out || !f->ids || !f->w) {
        moe_rpc_fail(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory for %d rows", f->T);
        goto out;
    }
    if (hb) {
        const uint8_t *h = q->hidden->data.data;

        for (size_t i = 0; i < n; i++) {
            uint16_t v;

            memcpy(&v, h + 2 * i, 2);
            f->x[i] = moe_bf16_to_f32(v);
        }
    }
    if (!nccl && !hidden_ok(f, hb ? (const void *)f->x : q->hidden->data.data, n, &err)) {
        moe_rpc_fail(call, st, "%s", err.msg);
        goto out;
    }
    memcpy(f->ids, q->expert_ids, tk * sizeof(int32_t));
    memcpy(f->w, q->weights, tk * sizeof(float));
    /* Checked here, not only by the engine: a bad request would fail every
     * request batched with it. */
    for (size_t i = 0; i < tk; i++) {
        size_t row = i / (size_t)m->cfg.top_k, lo = row * (size_t)m->cfg.top_k;
        bool dup = false;

        for (size_t j = lo; j < i && f->ids[i] >= 0; j++)
            dup |= f->ids[j] == f->ids[i];
        if (f->ids[i] < -1 || f->ids[i] >= m->cfg.n_experts || dup ||
            (f->ids[i] >= 0 && !isfinite(f->w[i]))) {
            moe_rpc_fail(call, st,
                         "routing of row %zu slot %zu: expert %d%s (model '%s' has experts 0 to "
                         "%d; -1 leaves a slot out)",
                         row, i - lo, (int)f->ids[i],
                         dup ? " twice"
                         : f->ids[i] >= 0 && f->ids[i] < m->cfg.n_experts
                             ? " with a weight that is not finite"
                             : " out of range",
                         q->model, m->cfg.n_experts - 1);
            goto out;
        }
    }
    f->req =
        (struct moe_sched_req){.engine = f->mm->e,
                               .a.layer = (int)q->layer,
                               .a.x = f->x,
                               .a.n_tokens = f->T,
                               .a.ids = f->ids,
                               .a.weights = f->w,
                               .a.flags = MOE_FWD_PARTIAL | (q->shared ? 0 : MOE_FWD_SKIP_SHARED),
                               .a.out = f->out,
                               .done = pfwd_done,
                               .arg = f};
    atomic_fetch_add(&d->in_flight, 1);
    if (c)
        atomic_fetch_add_explicit(&c->served, 1, memory_order_relaxed);
    if (nccl) {
        /* The rows come over NCCL, waited for on a thread of its own. */
        f->np = c && q->from ? peer_find(c, q->from) : NULL;
        if (f->np)
            atomic_fetch_add(&c->in_flight, 1); /* until pfwd_free */
        f->ngen = q->nccl_generation;
        f->nseq = q->nccl_seq;
        if (!f->np || !c->nccl_ok) {
            atomic_fetch_sub(&d->in_flight, 1);
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
        pthread_t t;

        if (pthread_create(&t, NULL, nccl_take_main, f) == 0) {
            pthread_detach(t);
            f = NULL;
            goto out;
        }
#endif
        atomic_fetch_sub(&d->in_flight, 1);
        moe_rpc_fail(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "cannot start a thread");
        goto out;
    }
    /* Straight to the scheduler: batched with this node's other work. */
    if (moe_sched_submit(d->sched, &f->req, &err) < 0) {
        atomic_fetch_sub(&d->in_flight, 1);
        moe_rpc_fail(call, moed_grpc_status(err.code), "%s", err.msg);
        goto out;
    }
    f = NULL;
out:
    if (f)
        pfwd_free(f);
    if (q)
        moe__v1__forward_experts_request__free_unpacked(q, NULL);
}

void moed_on_ping(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    struct moed *d = arg;
    Moe__V1__PingRequest *q = moe__v1__ping_request__unpack(NULL, len, req);
    Moe__V1__PingResponse a = MOE__V1__PING_RESPONSE__INIT;
    static const char *const states[] = {"serving", "draining", "stopping"};

    if (!q) {
        moe_rpc_fail(call, GRPC_STATUS_INVALID_ARGUMENT, "the request is not a PingRequest");
        return;
    }
    a.name = (char *)moed_cluster_node(d);
    a.uptime_ns = moe_now_ns() - d->t_start;
    a.state = (char *)states[atomic_load(&d->state)];
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
    view_get(c, &v);
    pthread_mutex_lock(&c->lock);
    s = mstate_get(c, mm);
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
            (char *)(i == v.self ? "self" : state_names[atomic_load(&v.peer[i]->state)]);
        pnodes[i] = &nodes[i];
    }
    for (int layer = 0; layer < mm->m->cfg.n_layers; layer++) {
        if (!mm->m->layers[layer].is_moe)
            continue;
        for (int e = 0; e < mm->m->cfg.n_experts; e++) {
            Moe__V1__PlacementEntry *pe = &ents[ne];
            int h[MAX_MEMBERS], nh = holders(c, &v, s, layer, e, h);
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
    view_put(c, &v);
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
