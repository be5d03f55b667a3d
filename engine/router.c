/*
 * Routing (see router.h): from router logits to each token's top-k experts
 * and their weights, and the checks on routing that a caller supplies.
 *
 * Owns nothing beyond a call and no global state, so any number of threads
 * may route at once.  Sigmoid routing takes one scratch allocation per call
 * (the biased scores and the group selection, O(n_experts)); everything per
 * token is on the stack, bounded by MOE_MAX_TOP_K.
 *
 * Selection is a partial one: a running list of the k best, sorted, that a
 * candidate enters only when strictly better than its last entry.  Candidates
 * are scanned in ascending id order, so on equal scores the earlier (lower)
 * id keeps its place: ties go to the lower id, for experts and for groups.
 * With random scores only O(k log(n / k)) candidates enter the list.
 *
 * Precision: selection uses the scores the models use, in fp32 (softmax
 * selects on the logits themselves, see route_softmax()).  The k weights
 * are then computed in double from the logits and rounded once to fp32.
 */
#include "router.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>

/* The k best seen so far, best first; equal scores in ascending id order. */
struct topk {
    int k;       /* capacity */
    int n;       /* entries held, 0..k */
    float *val;  /* [k] scores, descending */
    int32_t *id; /* [k] ids matching val */
};

static void topk_init(struct topk *t, int k, float *val, int32_t *id)
{
    t->k = k;
    t->n = 0;
    t->val = val;
    t->id = id;
}

/* Inserts (x, e) at or above slot j of val/id, shifting down the entries x
 * beats; equal ones stay ahead of it. */
static inline void topk_insert(float *restrict val, int32_t *restrict id, int j, float x, int e)
{
    while (j > 0 && val[j - 1] < x) {
        val[j] = val[j - 1];
        id[j] = id[j - 1];
        j--;
    }
    val[j] = x;
    id[j] = e;
}

/*
 * Offers the candidates v[lo..hi), with ids lo..hi-1; successive calls must
 * offer ascending ids.  Once the list is full a candidate enters only when
 * strictly better than the last entry, so an equal score with a lower id
 * (offered earlier) keeps its place.  The threshold stays in a register:
 * with random scores nearly every candidate costs one compare.
 */
static void topk_scan(struct topk *t, const float *restrict v, int lo, int hi)
{
    float *restrict val = t->val;
    int32_t *restrict id = t->id;
    const int k = t->k;
    int n = t->n, e = lo;
    float thr;

    for (; e < hi && n < k; e++, n++)
        topk_insert(val, id, n, v[e], e);
    t->n = n;
    if (n < k)
        return;
    thr = val[k - 1];
    for (; e < hi; e++) {
        if (!(v[e] > thr))
            continue;
        topk_insert(val, id, k - 1, v[e], e);
        thr = val[k - 1];
    }
}

/* Sorts k (id, weight) pairs by descending weight, equal weights by id. */
static void sort_by_weight(int k, int32_t *ids, float *w)
{
    for (int i = 1; i < k; i++) {
        int32_t id = ids[i];
        float v = w[i];
        int j = i;

        while (j > 0 && (w[j - 1] < v || (w[j - 1] == v && ids[j - 1] > id))) {
            ids[j] = ids[j - 1];
            w[j] = w[j - 1];
            j--;
        }
        ids[j] = id;
        w[j] = v;
    }
}

int moe_router_check(const struct moe_router_params *p, struct moe_error *err)
{
    int kmax, gsize;

    if (!p)
        return moe_error_set(err, -EINVAL, "router parameters are NULL");
    if (p->score_func != MOE_SCORE_SOFTMAX && p->score_func != MOE_SCORE_SIGMOID &&
        p->score_func != MOE_SCORE_TOPK_SIGMOID)
        return moe_error_set(err, -EINVAL,
                             "router parameter score_func is %d, expected %d (softmax), "
                             "%d (sigmoid) or %d (top-k then sigmoid)",
                             (int)p->score_func, MOE_SCORE_SOFTMAX, MOE_SCORE_SIGMOID,
                             MOE_SCORE_TOPK_SIGMOID);
    if (p->n_experts < 1 || p->n_experts > MOE_MAX_EXPERTS)
        return moe_error_set(err, -EINVAL, "router parameter n_experts is %d, expected 1..%d",
                             p->n_experts, MOE_MAX_EXPERTS);
    kmax = MOE_MIN(p->n_experts, MOE_MAX_TOP_K);
    if (p->top_k < 1 || p->top_k > kmax)
        return moe_error_set(err, -EINVAL,
                             "router parameter top_k is %d, expected 1..%d (at most n_experts "
                             "%d and at most %d)",
                             p->top_k, kmax, p->n_experts, MOE_MAX_TOP_K);
    if (p->n_group < 1 || p->n_experts % p->n_group != 0)
        return moe_error_set(err, -EINVAL,
                             "router parameter n_group is %d, expected a divisor >= 1 of "
                             "n_experts %d",
                             p->n_group, p->n_experts);
    gsize = p->n_experts / p->n_group;
    if (p->n_group > 1 && gsize < 2 && p->score_func == MOE_SCORE_SIGMOID)
        return moe_error_set(err, -EINVAL,
                             "router parameter n_group is %d, giving groups of %d expert of "
                             "n_experts %d, expected groups of at least 2 (a group scores "
                             "the sum of its two best experts)",
                             p->n_group, gsize, p->n_experts);
    if (p->topk_group < 1 || p->topk_group > p->n_group)
        return moe_error_set(err, -EINVAL,
                             "router parameter topk_group is %d, expected 1..n_group %d",
                             p->topk_group, p->n_group);
    if (p->top_k > p->topk_group * gsize)
        return moe_error_set(err, -EINVAL,
                             "router parameter top_k is %d, but topk_group %d groups of %d "
                             "experts hold only %d; expected top_k <= %d",
                             p->top_k, p->topk_group, gsize, p->topk_group * gsize,
                             p->topk_group * gsize);
    if (p->score_func == MOE_SCORE_TOPK_SIGMOID &&
        (p->n_group != 1 || p->norm_topk_prob || p->routed_scaling_factor != 1.0f))
        return moe_error_set(err, -EINVAL,
                             "router parameters n_group %d, norm_topk_prob %d, "
                             "routed_scaling_factor %g with top-k-then-sigmoid scores, expected "
                             "1, 0 and 1 (Llama 4's rule has none of them)",
                             p->n_group, (int)p->norm_topk_prob, (double)p->routed_scaling_factor);
    if (!isfinite(p->routed_scaling_factor) || !(p->routed_scaling_factor > 0))
        return moe_error_set(err, -EINVAL,
                             "router parameter routed_scaling_factor is %g, expected a finite "
                             "value > 0 (1 for none)",
                             (double)p->routed_scaling_factor);
    if (p->bias && p->score_func != MOE_SCORE_SIGMOID)
        return moe_error_set(err, -EINVAL,
                             "router parameter bias is set with softmax scores, expected NULL "
                             "(a selection bias is defined for sigmoid scores only)");
    if (p->bias) {
        for (int e = 0; e < p->n_experts; e++) {
            if (!isfinite(p->bias[e]))
                return moe_error_set(err, -EINVAL,
                                     "router parameter bias[%d] is %g, expected a finite value", e,
                                     (double)p->bias[e]);
        }
    }
    return 0;
}

/* Checks one token's logits are finite; returns their maximum or sets err. */
static int logits_max(const float *l, int n, int token, float *ret_max, struct moe_error *err)
{
    float m = -INFINITY;

    for (int e = 0; e < n; e++) {
        if (!isfinite(l[e]))
            return moe_error_set(err, -EINVAL,
                                 "token %d: router logit of expert %d is %g, expected a finite "
                                 "value",
                                 token, e, (double)l[e]);
        if (l[e] > m)
            m = l[e];
    }
    *ret_max = m;
    return 0;
}

/* Per-call scratch of sigmoid routing. */
struct route_scratch {
    float *c;      /* [n_experts] selection scores s + bias */
    float *gscore; /* [n_group] group scores, sum of the two best c */
    float *gval;   /* [n_group] selected group scores */
    int32_t *gid;  /* [n_group] selected group ids */
    bool *keep;    /* [n_group] group kept for this token */
};

/*
 * Softmax is strictly increasing in the logit, so the k largest p are the
 * experts with the k largest logits: select on the logits, which needs no
 * exponential at all, and treats as ties only experts whose exact p are
 * equal (fp32 p of nearby logits may round to the same value).  The sum of
 * all exponentials is needed only without renormalisation.
 */
static int route_softmax(const struct moe_router_params *p, const float *l, int token,
                         struct route_scratch *sc, int32_t *ids, float *w, struct moe_error *err)
{
    const int E = p->n_experts, K = p->top_k, G = p->n_group, gsize = E / G;
    float val[MOE_MAX_TOP_K];
    double ex[MOE_MAX_TOP_K], denom = 0;
    struct topk sel;
    float m = 0;
    int r;

    r = logits_max(l, E, token, &m, err);
    if (r < 0)
        return r;
    topk_init(&sel, K, val, ids);
    if (G > 1 && p->topk_group < G) {
        /* DeepSeek-V2 group_limited_greedy: a group scores its best p, that
         * is its largest logit; the other groups' experts are out (their p
         * masked to 0, below any p of a kept group). */
        struct topk gsel;

        for (int g = 0; g < G; g++) {
            const float *lg = l + (size_t)g * gsize;
            float b = -INFINITY;

            for (int i = 0; i < gsize; i++)
                b = lg[i] > b ? lg[i] : b;
            sc->gscore[g] = b;
            sc->keep[g] = false;
        }
        topk_init(&gsel, p->topk_group, sc->gval, sc->gid);
        topk_scan(&gsel, sc->gscore, 0, G);
        for (int j = 0; j < p->topk_group; j++)
            sc->keep[sc->gid[j]] = true;
        for (int g = 0; g < G; g++) {
            if (sc->keep[g])
                topk_scan(&sel, l, g * gsize, (g + 1) * gsize);
        }
    } else {
        topk_scan(&sel, l, 0, E);
    }
    for (int j = 0; j < K; j++) {
        ex[j] = exp((double)val[j] - m);
        if (p->norm_topk_prob)
            denom += ex[j];
    }
    if (!p->norm_topk_prob) {
        /* fp32 exponentials are enough for the sum: a term's error grows
         * with |l - m| only as fast as the term itself shrinks. */
        for (int e = 0; e < E; e++)
            denom += expf(l[e] - m);
    }
    for (int j = 0; j < K; j++)
        w[j] = (float)(ex[j] / denom * p->routed_scaling_factor);
    return 0;
}

static inline float sigmoidf(float x)
{
    return 1.0f / (1.0f + expf(-x));
}

/*
 * DeepSeek-V3 noaux_tc: selection on c = sigmoid(l) + bias, limited to the
 * topk_group groups with the best sum of two largest c; the weights are the
 * unbiased sigmoid scores.  Experts of dropped groups are not candidates at
 * all, which is what DeepSeek's masking with -inf does (masking with 0, as
 * some ports do, lets them win against negative c).
 */
static int route_sigmoid(const struct moe_router_params *p, const float *l, int token,
                         struct route_scratch *sc, int32_t *ids, float *w, struct moe_error *err)
{
    const int E = p->n_experts, K = p->top_k, G = p->n_group, gsize = E / G;
    float *c = sc->c, val[MOE_MAX_TOP_K];
    double s[MOE_MAX_TOP_K], denom = 0;
    struct topk sel;
    float m = 0;
    int r;

    r = logits_max(l, E, token, &m, err);
    if (r < 0)
        return r;
    for (int e = 0; e < E; e++)
        c[e] = sigmoidf(l[e]) + (p->bias ? p->bias[e] : 0.0f);

    topk_init(&sel, K, val, ids);
    if (G > 1 && p->topk_group < G) {
        struct topk gsel;

        for (int g = 0; g < G; g++) {
            const float *cg = c + (size_t)g * gsize;
            float b1 = -INFINITY, b2 = -INFINITY;

            for (int i = 0; i < gsize; i++) {
                if (cg[i] > b1) {
                    b2 = b1;
                    b1 = cg[i];
                } else if (cg[i] > b2) {
                    b2 = cg[i];
                }
            }
            sc->gscore[g] = b1 + b2;
            sc->keep[g] = false;
        }
        topk_init(&gsel, p->topk_group, sc->gval, sc->gid);
        topk_scan(&gsel, sc->gscore, 0, G);
        for (int j = 0; j < p->topk_group; j++)
            sc->keep[sc->gid[j]] = true;
        /* Kept groups in ascending order keep the candidates in id order. */
        for (int g = 0; g < G; g++) {
            if (sc->keep[g])
                topk_scan(&sel, c, g * gsize, (g + 1) * gsize);
        }
    } else {
        topk_scan(&sel, c, 0, E);
    }

    /* The unbiased scores, in double until the final rounding. */
    for (int j = 0; j < K; j++) {
        s[j] = 1.0 / (1.0 + exp(-(double)l[ids[j]]));
        denom += s[j];
    }
    for (int j = 0; j < K; j++) {
        double v = s[j];

        if (p->norm_topk_prob && K > 1)
            v /= denom + 1e-20;
        w[j] = (float)(v * p->routed_scaling_factor);
    }
    return 0;
}

/*
 * Llama 4: the top_k largest logits (torch.topk on the router's output),
 * each weighted by its sigmoid; the others' scores are sigmoid(-inf) = 0.
 */
static int route_topk_sigmoid(const struct moe_router_params *p, const float *l, int token,
                              int32_t *ids, float *w, struct moe_error *err)
{
    float val[MOE_MAX_TOP_K], m = 0;
    struct topk sel;
    int r;

    r = logits_max(l, p->n_experts, token, &m, err);
    if (r < 0)
        return r;
    topk_init(&sel, p->top_k, val, ids);
    topk_scan(&sel, l, 0, p->n_experts);
    for (int j = 0; j < p->top_k; j++)
        w[j] = (float)(1.0 / (1.0 + exp(-(double)l[ids[j]])));
    return 0;
}

int moe_route(const struct moe_router_params *p, const float *logits, int n_tokens,
              int32_t *ret_ids, float *ret_weights, struct moe_error *err)
{
    struct route_scratch sc = {0};
    void *buf = NULL;
    int r;

    r = moe_router_check(p, err);
    if (r < 0)
        return r;
    if (n_tokens < 0)
        return moe_error_set(err, -EINVAL, "token count is %d, expected >= 0", n_tokens);
    if (n_tokens == 0)
        return 0;
    if (!logits || !ret_ids || !ret_weights)
        return moe_error_set(err, -EINVAL, "router logits or outputs are NULL for %d tokens",
                             n_tokens);
    if (p->score_func == MOE_SCORE_SIGMOID || p->n_group > 1) {
        size_t E = (size_t)p->n_experts, G = (size_t)p->n_group;

        /* floats, then int32s, then bools: each part stays aligned. */
        buf = malloc((E + 2 * G) * sizeof(float) + G * sizeof(int32_t) + G * sizeof(bool));
        if (!buf)
            return moe_error_set(err, -ENOMEM, "out of memory for routing over %zu experts", E);
        sc.c = buf;
        sc.gscore = sc.c + E;
        sc.gval = sc.gscore + G;
        sc.gid = (int32_t *)(sc.gval + G);
        sc.keep = (bool *)(sc.gid + G);
    }

    for (int t = 0; t < n_tokens; t++) {
        const float *l = logits + (size_t)t * (size_t)p->n_experts;
        int32_t *ids = ret_ids + (size_t)t * (size_t)p->top_k;
        float *w = ret_weights + (size_t)t * (size_t)p->top_k;

        if (p->score_func == MOE_SCORE_SIGMOID)
            r = route_sigmoid(p, l, t, &sc, ids, w, err);
        else if (p->score_func == MOE_SCORE_TOPK_SIGMOID)
            r = route_topk_sigmoid(p, l, t, ids, w, err);
        else
            r = route_softmax(p, l, t, &sc, ids, w, err);
        if (r < 0)
            break;
        sort_by_weight(p->top_k, ids, w);
    }
    free(buf);
    return r;
}

int moe_routing_validate(int n_experts, int top_k, int n_tokens, const int32_t *ids,
                         const float *weights, struct moe_error *err)
{
    int kmax;

    if (n_experts < 1 || n_experts > MOE_MAX_EXPERTS)
        return moe_error_set(err, -EINVAL, "routing: n_experts is %d, expected 1..%d", n_experts,
                             MOE_MAX_EXPERTS);
    kmax = MOE_MIN(n_experts, MOE_MAX_TOP_K);
    if (top_k < 1 || top_k > kmax)
        return moe_error_set(err, -EINVAL, "routing: top_k is %d, expected 1..%d", top_k, kmax);
    if (n_tokens < 0)
        return moe_error_set(err, -EINVAL, "routing: token count is %d, expected >= 0", n_tokens);
    if (n_tokens > 0 && (!ids || !weights))
        return moe_error_set(err, -EINVAL, "routing: %s are NULL for %d tokens",
                             !ids ? "expert ids" : "weights", n_tokens);

    for (int t = 0; t < n_tokens; t++) {
        const int32_t *id = ids + (size_t)t * (size_t)top_k;
        const float *w = weights + (size_t)t * (size_t)top_k;

        for (int j = 0; j < top_k; j++) {
            if (id[j] < 0 || id[j] >= n_experts)
                return moe_error_set(err, -EINVAL,
                                     "routing of token %d slot %d: expert id %d is out of range, "
                                     "expected 0..%d",
                                     t, j, (int)id[j], n_experts - 1);
            for (int i = 0; i < j; i++) {
                if (id[i] == id[j])
                    return moe_error_set(err, -EINVAL,
                                         "routing of token %d slot %d: expert id %d is already "
                                         "in slot %d, expected each expert at most once",
                                         t, j, (int)id[j], i);
            }
            if (!isfinite(w[j]))
                return moe_error_set(err, -EINVAL,
                                     "routing of token %d slot %d: weight %g is not finite", t, j,
                                     (double)w[j]);
        }
    }
    return 0;
}
