/*
 * Replacement policies (policy.h): lru, freq and routing.
 *
 * Decay: an expert's use count is halved every half_life uses of its
 * layer.  Stored as (count, last) and ordered by
 *   key = log2(count) + last / half_life,
 * which orders experts of one layer by their current decayed count without
 * touching every count at each step (all of a layer's counts decay at the
 * same rate).
 *
 * routing: the expected number of steps until an expert is next used,
 *   T = distance(layer) + cycle * (1 / p - 1),
 * where distance is how many MoE layers run before its layer runs again
 * (layers just run are needed last), cycle the model's number of MoE
 * layers, and p the probability that a pass of its layer uses it: its
 * decayed count over the decayed number of passes, or the predictor's
 * forecast when its layer runs next and that is higher.  The victim is the
 * expert with the largest T: within a layer the least popular resident one
 * (a heap per layer), across layers the largest T of those candidates.
 * That is Belady's rule (evict what is needed farthest in the future) with
 * the future estimated from the routing.
 *
 * adaptive: the tier's resident nodes are in an lru list and in routing's
 * heaps at once (the node has room for both).  Each use also goes to two
 * shadow policies (an lru and a routing instance) over the expert's ghost
 * nodes: a ghost is resident in its shadow as the expert would be in a
 * cache of that policy alone, demand paged, holding as many experts as the
 * tier has held at most; a use that finds its ghost resident is a hit of
 * that shadow.  The victim is lru's or routing's, whichever shadow has more
 * hits, decayed by ADAPT_DECAY per use (ties: routing).
 */
#include "policy.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- heap ----------------------------------------------------------------------------------- */

static void heap_set(struct moe_pheap *h, int i, struct moe_pnode *n)
{
    h->a[i] = n;
    n->heap = i;
}

static void heap_up(struct moe_pheap *h, int i)
{
    struct moe_pnode *n = h->a[i];

    while (i > 0) {
        int parent = (i - 1) / 2;

        if (h->a[parent]->key <= n->key)
            break;
        heap_set(h, i, h->a[parent]);
        i = parent;
    }
    heap_set(h, i, n);
}

static void heap_down(struct moe_pheap *h, int i)
{
    struct moe_pnode *n = h->a[i];

    for (;;) {
        int c = 2 * i + 1;

        if (c >= h->n)
            break;
        if (c + 1 < h->n && h->a[c + 1]->key < h->a[c]->key)
            c++;
        if (n->key <= h->a[c]->key)
            break;
        heap_set(h, i, h->a[c]);
        i = c;
    }
    heap_set(h, i, n);
}

static int heap_push(struct moe_pheap *h, struct moe_pnode *n)
{
    if (h->n == h->cap) {
        int cap = h->cap ? 2 * h->cap : 64;
        struct moe_pnode **a = realloc(h->a, (size_t)cap * sizeof(*a));

        if (!a)
            return -ENOMEM;
        h->a = a;
        h->cap = cap;
    }
    heap_set(h, h->n++, n);
    heap_up(h, h->n - 1);
    return 0;
}

static void heap_remove(struct moe_pheap *h, struct moe_pnode *n)
{
    int i = n->heap;

    if (i < 0)
        return;
    n->heap = -1;
    h->n--;
    if (i == h->n)
        return;
    heap_set(h, i, h->a[h->n]);
    heap_up(h, i);
    heap_down(h, h->a[i]->heap);
}

static void heap_update(struct moe_pheap *h, struct moe_pnode *n)
{
    if (n->heap < 0)
        return;
    heap_up(h, n->heap);
    heap_down(h, n->heap);
}

/* The first node in key order for which ok() holds; nodes skipped on the
 * way are put back. */
static struct moe_pnode *heap_first_ok(struct moe_pheap *h, bool (*ok)(struct moe_pnode *, void *),
                                       void *arg)
{
    struct moe_pnode *skipped[64], *found = NULL;
    int n_skipped = 0;

    while (h->n > 0) {
        struct moe_pnode *n = h->a[0];

        if (ok(n, arg)) {
            found = n;
            break;
        }
        if (n_skipped == (int)MOE_ARRAY_SIZE(skipped))
            break; /* give up on this heap rather than scan it all */
        heap_remove(h, n);
        skipped[n_skipped++] = n;
    }
    for (int i = 0; i < n_skipped; i++)
        heap_push(h, skipped[i]); /* cannot fail: the array had room for them */
    return found;
}

/* ---- decayed counts ------------------------------------------------------------------------ */

static void count_use(const struct moe_policy_env *env, struct moe_pnode *n)
{
    double now = env->passes(env->ctx, n->group);
    double h = env->half_life;

    n->count = n->count * exp2(-(now - n->last) / h) + 1.0;
    n->last = now;
    n->key = log2(n->count) + now / h;
}

/* The current probability that a pass of n's layer uses it. */
static double popularity(const struct moe_policy_env *env, const struct moe_pnode *n)
{
    double now = env->passes(env->ctx, n->group);
    double h = env->half_life;
    double c, passes;

    if (n->count <= 0.0 || now <= 0.0)
        return 0.0;
    c = n->count * exp2(-(now - n->last) / h);
    /* decayed number of passes: sum over k < now of 2^(-k / h) */
    passes = (1.0 - exp2(-now / h)) / (1.0 - exp2(-1.0 / h));
    return MOE_MIN(1.0, c / passes);
}

static double expected_wait(const struct moe_policy_env *env, int group, double p)
{
    p = MOE_MAX(p, 1e-9);
    return env->distance(env->ctx, group) + env->cycle(env->ctx, group) * (1.0 / p - 1.0);
}

/* ---- lru ----------------------------------------------------------------------------------- */

static void list_unlink(struct moe_pnode *n)
{
    if (n->prev) {
        n->prev->next = n->next;
        n->next->prev = n->prev;
    }
    n->prev = n->next = NULL;
}

static void list_push_front(struct moe_pnode *head, struct moe_pnode *n)
{
    n->next = head->next;
    n->prev = head;
    head->next->prev = n;
    head->next = n;
}

static void lru_insert(struct moe_policy *p, struct moe_pnode *n)
{
    list_push_front(&p->lru, n);
}

static void lru_remove(struct moe_policy *p, struct moe_pnode *n)
{
    (void)p;
    list_unlink(n);
}

static void lru_touch(struct moe_policy *p, struct moe_pnode *n)
{
    if (!n->resident)
        return;
    list_unlink(n);
    list_push_front(&p->lru, n);
}

static struct moe_pnode *lru_victim(struct moe_policy *p, bool (*ok)(struct moe_pnode *, void *),
                                    void *arg)
{
    for (struct moe_pnode *n = p->lru.prev; n != &p->lru; n = n->prev)
        if (ok(n, arg))
            return n;
    return NULL;
}

static bool always(struct moe_policy *p, int group, double prob, struct moe_pnode *victim)
{
    (void)p, (void)group, (void)prob, (void)victim;
    return true;
}

/* ---- freq ---------------------------------------------------------------------------------- */

static void freq_insert(struct moe_policy *p, struct moe_pnode *n)
{
    heap_push(&p->heap, n);
}

static void freq_remove(struct moe_policy *p, struct moe_pnode *n)
{
    heap_remove(&p->heap, n);
}

static void freq_touch(struct moe_policy *p, struct moe_pnode *n)
{
    count_use(p->env, n);
    heap_update(&p->heap, n);
}

static struct moe_pnode *freq_victim(struct moe_policy *p, bool (*ok)(struct moe_pnode *, void *),
                                     void *arg)
{
    struct moe_pnode *v = heap_first_ok(&p->heap, ok, arg);

    if (!v) {
        /* Everything near the top is pinned: take any evictable one. */
        for (int i = 0; i < p->heap.n && !v; i++)
            if (ok(p->heap.a[i], arg))
                v = p->heap.a[i];
    }
    return v;
}

/* ---- routing ------------------------------------------------------------------------------- */

static void routing_insert(struct moe_policy *p, struct moe_pnode *n)
{
    if (n->group < p->n_groups)
        heap_push(&p->groups[n->group], n);
}

static void routing_remove(struct moe_policy *p, struct moe_pnode *n)
{
    if (n->group < p->n_groups)
        heap_remove(&p->groups[n->group], n);
}

static void routing_touch(struct moe_policy *p, struct moe_pnode *n)
{
    count_use(p->env, n);
    if (n->group < p->n_groups)
        heap_update(&p->groups[n->group], n);
}

static double node_wait(const struct moe_policy_env *env, const struct moe_pnode *n)
{
    double pop = popularity(env, n);
    double pred = env->predicted(env->ctx, n->group, n->expert);

    return expected_wait(env, n->group, MOE_MAX(pop, pred));
}

static struct moe_pnode *routing_victim(struct moe_policy *p,
                                        bool (*ok)(struct moe_pnode *, void *), void *arg)
{
    struct moe_pnode *best = NULL;
    double best_t = -1.0;

    for (int g = 0; g < p->n_groups; g++) {
        struct moe_pnode *n = heap_first_ok(&p->groups[g], ok, arg);
        double t;

        if (!n)
            continue;
        t = node_wait(p->env, n);
        if (t > best_t) {
            best_t = t;
            best = n;
        }
    }
    return best;
}

static bool routing_prefer(struct moe_policy *p, int group, double prob, struct moe_pnode *victim)
{
    return expected_wait(p->env, group, prob) < node_wait(p->env, victim);
}

/* ---- adaptive ------------------------------------------------------------------------------ */

/* Decay of the shadows' hit counts per use: about the last thousand uses
 * decide (a DeepSeek-V3 token is 464 uses, a Mixtral one 64). */
#define ADAPT_DECAY (1.0 - 1.0 / 1024)

static bool adaptive_follows_lru(const struct moe_policy *p)
{
    return p->score[MOE_SHADOW_LRU] > p->score[MOE_SHADOW_ROUTING];
}

static void adaptive_insert(struct moe_policy *p, struct moe_pnode *n)
{
    lru_insert(p, n);
    routing_insert(p, n);
    p->resident++;
    p->cap = MOE_MAX(p->cap, p->resident);
}

static void adaptive_remove(struct moe_policy *p, struct moe_pnode *n)
{
    lru_remove(p, n);
    routing_remove(p, n);
    p->resident--;
}

static bool any_but(struct moe_pnode *n, void *arg)
{
    return n != arg;
}

/* A use of ghost g in shadow s of capacity cap: 1 for a hit, 0 a miss (it
 * is paged in, and the shadow's victims leave until it fits). */
static int shadow_use(struct moe_policy *s, struct moe_pnode *g, int64_t cap)
{
    if (g->resident) {
        s->ops->touch(s, g);
        return 1;
    }
    g->resident = true;
    s->ops->insert(s, g);
    s->resident++;
    s->ops->touch(s, g);
    while (s->resident > cap) {
        struct moe_pnode *v = s->ops->victim(s, any_but, g);

        if (!v)
            break;
        s->ops->remove(s, v);
        v->resident = false;
        s->resident--;
    }
    return 0;
}

static void adaptive_touch(struct moe_policy *p, struct moe_pnode *n)
{
    lru_touch(p, n);
    routing_touch(p, n);
    if (!n->ghost || !p->shadow)
        return;
    for (int i = 0; i < MOE_SHADOWS; i++)
        p->score[i] =
            p->score[i] * ADAPT_DECAY + shadow_use(&p->shadow[i], &n->ghost[i], MOE_MAX(p->cap, 1));
}

static struct moe_pnode *adaptive_victim(struct moe_policy *p,
                                         bool (*ok)(struct moe_pnode *, void *), void *arg)
{
    return adaptive_follows_lru(p) ? lru_victim(p, ok, arg) : routing_victim(p, ok, arg);
}

static bool adaptive_prefer(struct moe_policy *p, int group, double prob, struct moe_pnode *victim)
{
    return adaptive_follows_lru(p) || routing_prefer(p, group, prob, victim);
}

void moe_policy_forget(struct moe_policy *p, struct moe_pnode *n)
{
    for (int i = 0; p->shadow && n->ghost && i < MOE_SHADOWS; i++) {
        struct moe_pnode *g = &n->ghost[i];

        if (!g->resident)
            continue;
        p->shadow[i].ops->remove(&p->shadow[i], g);
        g->resident = false;
        p->shadow[i].resident--;
    }
}

int moe_policy_following(const struct moe_policy *p)
{
    if (!p->shadow)
        return -1;
    return adaptive_follows_lru(p) ? MOE_SHADOW_LRU : MOE_SHADOW_ROUTING;
}

/* ---- table --------------------------------------------------------------------------------- */

static const struct moe_policy_ops ops[MOE_POLICY_COUNT] = {
    [MOE_POLICY_LRU] = {"lru", lru_insert, lru_remove, lru_touch, lru_victim, always},
    [MOE_POLICY_FREQ] = {"freq", freq_insert, freq_remove, freq_touch, freq_victim, always},
    [MOE_POLICY_ROUTING] = {"routing", routing_insert, routing_remove, routing_touch,
                            routing_victim, routing_prefer},
    [MOE_POLICY_ADAPTIVE] = {"adaptive", adaptive_insert, adaptive_remove, adaptive_touch,
                             adaptive_victim, adaptive_prefer},
};

int moe_cache_policy_parse(const char *s, enum moe_cache_policy *ret)
{
    for (int i = 0; i < MOE_POLICY_COUNT; i++) {
        if (s && strcmp(s, ops[i].name) == 0) {
            *ret = (enum moe_cache_policy)i;
            return 0;
        }
    }
    return -EINVAL;
}

const char *moe_cache_policy_name(enum moe_cache_policy p)
{
    return (unsigned)p < MOE_POLICY_COUNT ? ops[p].name : "?";
}

void moe_pnode_init(struct moe_pnode *n, struct moe_pnode *ghost, int group, int model, int layer,
                    int expert)
{
    memset(n, 0, sizeof(*n));
    n->heap = -1;
    n->group = group;
    n->model = model;
    n->layer = layer;
    n->expert = expert;
    if (ghost) {
        for (int i = 0; i < MOE_SHADOWS; i++)
            moe_pnode_init(&ghost[i], NULL, group, model, layer, expert);
        n->ghost = ghost;
    }
}

void moe_pnode_reset_ghosts(struct moe_pnode *n)
{
    for (int i = 0; n->ghost && i < MOE_SHADOWS; i++) {
        struct moe_pnode *g = &n->ghost[i];

        g->prev = g->next = NULL;
        g->heap = -1;
        g->resident = false;
    }
}

int moe_policy_init(struct moe_policy *p, enum moe_cache_policy kind,
                    const struct moe_policy_env *env)
{
    if ((unsigned)kind >= MOE_POLICY_COUNT)
        return -EINVAL;
    memset(p, 0, sizeof(*p));
    p->ops = &ops[kind];
    p->env = env;
    p->lru.next = p->lru.prev = &p->lru;
    if (kind == MOE_POLICY_ADAPTIVE) {
        p->shadow = calloc(MOE_SHADOWS, sizeof(*p->shadow));
        if (!p->shadow || moe_policy_init(&p->shadow[MOE_SHADOW_LRU], MOE_POLICY_LRU, env) < 0 ||
            moe_policy_init(&p->shadow[MOE_SHADOW_ROUTING], MOE_POLICY_ROUTING, env) < 0) {
            moe_policy_clear(p);
            return -ENOMEM;
        }
    }
    if (moe_policy_grow(p, env->n_groups) < 0) {
        moe_policy_clear(p);
        return -ENOMEM;
    }
    return 0;
}

int moe_policy_grow(struct moe_policy *p, int n_groups)
{
    struct moe_pheap *g;

    for (int i = 0; p->shadow && i < MOE_SHADOWS; i++)
        if (moe_policy_grow(&p->shadow[i], n_groups) < 0)
            return -ENOMEM;
    if (n_groups <= p->n_groups)
        return 0;
    g = realloc(p->groups, (size_t)n_groups * sizeof(*g));
    if (!g)
        return -ENOMEM;
    memset(g + p->n_groups, 0, (size_t)(n_groups - p->n_groups) * sizeof(*g));
    p->groups = g;
    p->n_groups = n_groups;
    return 0;
}

void moe_policy_clear(struct moe_policy *p)
{
    for (int i = 0; p->shadow && i < MOE_SHADOWS; i++)
        moe_policy_clear(&p->shadow[i]);
    free(p->shadow);
    for (int g = 0; g < p->n_groups; g++)
        free(p->groups[g].a);
    free(p->groups);
    free(p->heap.a);
    memset(p, 0, sizeof(*p));
}
