/*
 * The cluster's peers: their lifecycle and references, their idle gRPC
 * clients, the view of the members a request works with, and the model
 * state the placement reads (cluster_int.h).
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

const char *const moed_cl_peer_state_names[] = {"down", "up", "refused"};

const char *moed_cluster_node(struct moed *d)
{
    return cl_of(d) ? cl_of(d)->node : "";
}

/* ---- peers ----------------------------------------------------------------------------- */

void moed_cl_peer_hot_clear(struct peer *p)
{
    for (int i = 0; i < p->n_hot; i++)
        free(p->hot[i].experts);
    free(p->hot);
    p->hot = NULL;
    p->n_hot = 0;
}

void moed_cl_peer_free(struct peer *p)
{
    if (p->link_close)
        p->link_close(&p->nl);
    pthread_mutex_destroy(&p->nl.out_lock);
    pthread_mutex_destroy(&p->nl.in_lock);
    pthread_cond_destroy(&p->nl.in_cond);
    moed_cl_peer_hot_clear(p);
    for (int i = 0; i < p->n_idle; i++)
        moe_rpc_client_close(p->idle[i]);
    pthread_mutex_destroy(&p->lock);
    free((char *)p->cfg.target);
    free(p->name);
    free(p->address);
    free(p);
}

struct peer *moed_cl_peer_new(struct moed *d, const char *name, const char *address)
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

void moed_cl_peer_put(struct moed_cluster *c, struct peer *p)
{
    bool gone;

    pthread_mutex_lock(&c->lock);
    gone = --p->refs == 0 && p->removed;
    pthread_mutex_unlock(&c->lock);
    if (gone)
        moed_cl_peer_free(p);
}

/* A client of p for one call (from the idle ones, or a new one). */
struct moe_rpc_client *moed_cl_client_get(struct peer *p, int timeout_ms, char *msg, size_t len)
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

void moed_cl_client_put(struct peer *p, struct moe_rpc_client *cl, bool keep)
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

void moed_cl_set_error(struct peer *p, const char *msg)
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

/* Takes a view of the members (refs on the peers); moed_cl_view_put gives it back. */
void moed_cl_view_get(struct moed_cluster *c, struct view *v)
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

void moed_cl_view_put(struct moed_cluster *c, struct view *v)
{
    for (int i = 0; i < v->n; i++)
        if (v->peer[i])
            moed_cl_peer_put(c, v->peer[i]);
    v->n = 0;
}

bool moed_cl_member_up(const struct view *v, int i)
{
    return i == v->self ||
           atomic_load_explicit(&v->peer[i]->state, memory_order_relaxed) == PEER_UP;
}

/* ---- placement ------------------------------------------------------------------------- */

/* The model's state here, made on first use (lock held). */
struct mstate *moed_cl_mstate_get(struct moed_cluster *c, const struct moed_model *mm)
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
int moed_cl_holders(const struct moed_cluster *c, const struct view *v, const struct mstate *s,
                    int layer, int expert, int *ret)
{
    bool hot = s && atomic_load_explicit(&s->hot_all[(size_t)layer * s->n_experts + expert],
                                         memory_order_relaxed);

    return moed_placement_holders(v->n, layer, expert, hot, c->d->cfg.replicas, ret);
}

static bool view_member_up(const void *v, int m)
{
    return moed_cl_member_up(v, m);
}

/* The member to send (layer, expert) to: a holder that is up (spread by
 * salt), else this node, which pages it in itself. */
int moed_cl_pick(const struct moed_cluster *c, const struct view *v, const struct mstate *s,
                 int layer, int expert, uint32_t salt, int not )
{
    int h[MAX_MEMBERS], n = moed_cl_holders(c, v, s, layer, expert, h);

    return moed_placement_pick(h, n, salt, not, view_member_up, v, v->self);
}

/* The peer called name, with a reference (moed_cl_peer_put), or NULL. */
struct peer *moed_cl_peer_find(struct moed_cluster *c, const char *name)
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
