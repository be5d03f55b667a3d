/*
 * Routing (engine/router.c): hand-computed cases for each rule (softmax
 * with and without renormalisation, DeepSeek-V2's softmax groups, DeepSeek-V3
 * sigmoid with bias, groups and scaling, ties), an independent fp64 reference (full sort in double)
 * compared on random tokens over many parameter sets, exact ties, and the
 * tables of bad parameters and bad caller routing with their messages.
 */
#include "router.h"
#include "tests.h"

#include <errno.h>

/* Parameters with the defaults of an unlimited router. */
static struct moe_router_params params(enum moe_score_func f, int E, int k, bool norm)
{
    struct moe_router_params p = {
        .score_func = f,
        .n_experts = E,
        .top_k = k,
        .norm_topk_prob = norm,
        .n_group = 1,
        .topk_group = 1,
        .routed_scaling_factor = 1.0f,
        .bias = NULL,
    };
    return p;
}

/* Routes one token and checks its ids and weights (to 1e-6 relative). */
static void check_one(const struct moe_router_params *p, const float *logits, const int32_t *ids,
                      const double *w, int line)
{
    int32_t got_ids[MOE_MAX_TOP_K];
    float got_w[MOE_MAX_TOP_K];
    struct moe_error err = {0};
    int r;

    r = moe_route(p, logits, 1, got_ids, got_w, &err);
    if (r != 0)
        FAIL("case at line %d: moe_route returned %d: %s", line, r, err.msg);
    for (int j = 0; j < p->top_k; j++) {
        if (got_ids[j] != ids[j])
            FAIL("case at line %d: slot %d: expert %d, expected %d", line, j, (int)got_ids[j],
                 (int)ids[j]);
        if (!(fabs(got_w[j] - w[j]) <= 1e-6 * fabs(w[j])))
            FAIL("case at line %d: slot %d: weight %.9g, expected %.9g", line, j, (double)got_w[j],
                 w[j]);
    }
}

/*
 * DeepSeek-V2 group_limited_greedy by hand: 8 experts in 4 groups of 2, keep
 * 2 groups by their best expert, top 3 of their experts, x 16.  Logits
 * [0, 3 | 2.9, 2.8 | 1, -1 | 2.5, 0]: group bests 3, 2.9, 1, 2.5 keep groups
 * 0 and 1; the top 3 of experts 0..3 are 1, 2, 3 (expert 7 at 2.5 beats
 * expert 3 overall but its group is out).  Weights: p over all 8, x 16.
 */
static void test_softmax_groups_case(void)
{
    static const float l[] = {0, 3, 2.9f, 2.8f, 1, -1, 2.5f, 0};
    struct moe_router_params p = params(MOE_SCORE_SOFTMAX, 8, 3, false);
    struct moe_error err = {0};
    double sum = 0;
    int32_t ids[3];
    float w[3];

    p.n_group = 4;
    p.topk_group = 2;
    p.routed_scaling_factor = 16.0f;
    for (int e = 0; e < 8; e++)
        sum += exp(l[e]);
    ASSERT_EQ(moe_route(&p, l, 1, ids, w, &err), 0);
    ASSERT_EQ(ids[0], 1);
    ASSERT_EQ(ids[1], 2);
    ASSERT_EQ(ids[2], 3);
    ASSERT_NEAR(w[0], 16 * exp(3.0) / sum, 1e-6);
    ASSERT_NEAR(w[1], 16 * exp(2.9) / sum, 1e-6);
    ASSERT_NEAR(w[2], 16 * exp(2.8) / sum, 1e-6);
    /* Group bests 3, 0.5, 2.45, 2.5 keep groups 0 and 3: expert 4 (2.45)
     * is out, and the third is expert 0 (0), tied with expert 7, lower id. */
    {
        static const float l2[] = {0, 3, 0.5f, 0.4f, 2.45f, -1, 2.5f, 0};

        ASSERT_EQ(moe_route(&p, l2, 1, ids, w, &err), 0);
        ASSERT_EQ(ids[0], 1);
        ASSERT_EQ(ids[1], 6);
        ASSERT_EQ(ids[2], 0);
    }
}

static void test_softmax_cases(void)
{
    /*
     * logits [1, 2, 3, 4]: e^l = [2.718281828, 7.389056099, 20.08553692,
     * 54.59815003], sum 84.79102488, so p = [0.0320586033, 0.0871443187,
     * 0.2368828181, 0.6439142599].  Top 2: experts 3 and 2.
     */
    static const float l4[] = {1, 2, 3, 4};
    struct moe_router_params p = params(MOE_SCORE_SOFTMAX, 4, 2, false);

    /* Without renormalisation the weights are p itself. */
    check_one(&p, l4, (const int32_t[]){3, 2}, (const double[]){0.6439142599, 0.2368828181},
              __LINE__);
    /* With: p3 / (p3 + p2) = 1 / (1 + e^-1) = 0.7310585786, and 0.2689414214. */
    p.norm_topk_prob = true;
    check_one(&p, l4, (const int32_t[]){3, 2}, (const double[]){0.7310585786, 0.2689414214},
              __LINE__);
    /* Top 1 renormalised is 1; not renormalised it is p3. */
    p.top_k = 1;
    check_one(&p, l4, (const int32_t[]){3}, (const double[]){1.0}, __LINE__);
    p.norm_topk_prob = false;
    check_one(&p, l4, (const int32_t[]){3}, (const double[]){0.6439142599}, __LINE__);
    /* All four: every p, in descending order. */
    p.top_k = 4;
    check_one(&p, l4, (const int32_t[]){3, 2, 1, 0},
              (const double[]){0.6439142599, 0.2368828181, 0.0871443187, 0.0320586033}, __LINE__);
    /* The scaling factor multiplies the weights: 2.5 * [0.7310585786, 0.2689414214]. */
    p.top_k = 2;
    p.norm_topk_prob = true;
    p.routed_scaling_factor = 2.5f;
    check_one(&p, l4, (const int32_t[]){3, 2}, (const double[]){1.8276464466, 0.6723535534},
              __LINE__);

    /* Shifting every logit by a constant changes nothing (stable softmax),
     * even by 1e30 where a naive exp overflows. */
    {
        static const float big[] = {1e30f, 1e30f, 1e30f, 1e30f};
        static const float shifted[] = {101, 102, 103, 104};

        p = params(MOE_SCORE_SOFTMAX, 4, 2, false);
        check_one(&p, shifted, (const int32_t[]){3, 2},
                  (const double[]){0.6439142599, 0.2368828181}, __LINE__);
        /* Equal logits: p = 1/4 each; ties go to the lower ids. */
        check_one(&p, big, (const int32_t[]){0, 1}, (const double[]){0.25, 0.25}, __LINE__);
    }

    /* Ties: logits [1, 3, 3, 0, 3], top 2 takes experts 1 and 2 of the three
     * at 3; renormalised 0.5 each, lower id first. */
    {
        static const float tie[] = {1, 3, 3, 0, 3};

        p = params(MOE_SCORE_SOFTMAX, 5, 2, true);
        check_one(&p, tie, (const int32_t[]){1, 2}, (const double[]){0.5, 0.5}, __LINE__);
        /* Top 3 of them: 1, 2, 4, a third each. */
        p.top_k = 3;
        check_one(&p, tie, (const int32_t[]){1, 2, 4}, (const double[]){1.0 / 3, 1.0 / 3, 1.0 / 3},
                  __LINE__);
    }

    /* One expert: always expert 0, weight 1 (p = 1 with or without norm). */
    {
        static const float one[] = {-7};

        p = params(MOE_SCORE_SOFTMAX, 1, 1, false);
        check_one(&p, one, (const int32_t[]){0}, (const double[]){1.0}, __LINE__);
    }
}

static void test_sigmoid_cases(void)
{
    /*
     * 8 experts in 4 groups of 2 ({0,1} {2,3} {4,5} {6,7}), keep 2 groups,
     * top 2, renormalised, scaling 2.5.
     *   logits  [ 2.0,  -1.0,   1.0,   0.5,   0.0,  -2.0,   1.5,  -0.5]
     *   s       [.880797 .268941 .731059 .622459 .5   .119203 .817574 .377541]
     */
    static const float l[] = {2.0f, -1.0f, 1.0f, 0.5f, 0.0f, -2.0f, 1.5f, -0.5f};
    static const float bias[] = {0, 0, 0, 0, 0.6f, 0.4f, 0, 0};
    struct moe_router_params p = params(MOE_SCORE_SIGMOID, 8, 2, true);

    p.n_group = 4;
    p.topk_group = 2;
    p.routed_scaling_factor = 2.5f;

    /*
     * No bias: group scores (sum of the two in each) 1.149738, 1.353518,
     * 0.619203, 1.195115: groups 1 and 3 are kept.  Expert 0 has the best
     * score of all (0.880797) but its group is dropped: the top 2 of
     * {2, 3, 6, 7} are 6 (0.817574) and 2 (0.731059).  Weights:
     * 2.5 * 0.817574 / 1.548633 = 1.319832470, 2.5 * 0.731059 / 1.548633 =
     * 1.180167530.
     */
    check_one(&p, l, (const int32_t[]){6, 2}, (const double[]){1.3198324704, 1.1801675296},
              __LINE__);

    /* Without group limiting expert 0 wins: 0 (0.880797) and 6 (0.817574),
     * 2.5 * 0.880797 / 1.698371 = 1.296531, 2.5 * 0.817574 / 1.698371 = 1.203469. */
    {
        struct moe_router_params q = p;
        double s0 = 1 / (1 + exp(-2.0)), s6 = 1 / (1 + exp(-1.5));

        q.n_group = 1;
        q.topk_group = 1;
        check_one(&q, l, (const int32_t[]){0, 6},
                  (const double[]){2.5 * s0 / (s0 + s6), 2.5 * s6 / (s0 + s6)}, __LINE__);
        /* All groups kept is the same as no groups. */
        q.n_group = 4;
        q.topk_group = 4;
        check_one(&q, l, (const int32_t[]){0, 6},
                  (const double[]){2.5 * s0 / (s0 + s6), 2.5 * s6 / (s0 + s6)}, __LINE__);
    }

    /*
     * Bias [0 0 0 0 0.6 0.4 0 0]: c = s + bias = [.880797 .268941 .731059
     * .622459 1.1 .519203 .817574 .377541]; group scores 1.149738, 1.353518,
     * 1.619203, 1.195115 keep groups 2 and 1.  Top 2 of c in {2, 3, 4, 5}:
     * 4 (1.1) then 2 (0.731059).  The weights are the unbiased s: 0.5 and
     * 0.731059, renormalised: 0.406154, 0.593845, times 2.5: 1.015386288,
     * 1.484613712.  Expert 2's weight is the larger, so it comes first though
     * expert 4 was selected first.
     */
    p.bias = bias;
    check_one(&p, l, (const int32_t[]){2, 4}, (const double[]){1.4846137124, 1.0153862876},
              __LINE__);

    /* Not renormalised: 2.5 * s = 2.5 * 0.731059 = 1.827646, 2.5 * 0.5 = 1.25. */
    p.norm_topk_prob = false;
    check_one(&p, l, (const int32_t[]){2, 4}, (const double[]){1.8276464466, 1.25}, __LINE__);

    /* top_k 1 is never renormalised: expert 4 (c = 1.1), weight 2.5 * 0.5. */
    p.norm_topk_prob = true;
    p.top_k = 1;
    check_one(&p, l, (const int32_t[]){4}, (const double[]){1.25}, __LINE__);

    /*
     * Negative biased scores: 4 experts in 2 groups, keep 1, top 2.
     *   logits [0, 1, 0, 0]: s = [0.5, 0.731059, 0.5, 0.5]
     *   bias [-1, -1.5, -2, -2]: c = [-0.5, -0.768941, -1.5, -1.5]
     * Group scores -1.268941 and -3: group 0 is kept.  Its two experts are
     * chosen although a mask of 0 (instead of -inf) on group 1 would make
     * experts 2 and 3 (masked c = 0) beat them.  Weights: 0.731059 /
     * 1.231059 = 0.5938454850 and 0.5 / 1.231059 = 0.4061545150.
     */
    {
        static const float ln[] = {0, 1, 0, 0};
        static const float bn[] = {-1.0f, -1.5f, -2.0f, -2.0f};

        p = params(MOE_SCORE_SIGMOID, 4, 2, true);
        p.n_group = 2;
        p.topk_group = 1;
        p.bias = bn;
        check_one(&p, ln, (const int32_t[]){1, 0}, (const double[]){0.5938454850, 0.4061545150},
                  __LINE__);
        /* Top 1 of the kept group: expert 0 (c = -0.5), weight s = 0.5. */
        p.top_k = 1;
        check_one(&p, ln, (const int32_t[]){0}, (const double[]){0.5}, __LINE__);
    }

    /*
     * Group ties go to the lower group: logits 0 (s = 0.5), bias [0, 0,
     * 0.25, -0.25]: c = [0.5, 0.5, 0.75, 0.25], both groups score exactly 1.
     * Keep 1 group: group 0, so expert 0 (tie with 1: lower id), although
     * expert 2 has the best c.  Weight 0.5 (top 1, no renormalisation).
     */
    {
        static const float lz[] = {0, 0, 0, 0};
        static const float bt[] = {0, 0, 0.25f, -0.25f};

        p = params(MOE_SCORE_SIGMOID, 4, 1, true);
        p.n_group = 2;
        p.topk_group = 1;
        p.bias = bt;
        check_one(&p, lz, (const int32_t[]){0}, (const double[]){0.5}, __LINE__);
        /* Top 2: experts 0 and 1, 0.5 each renormalised, lower id first. */
        p.top_k = 2;
        check_one(&p, lz, (const int32_t[]){0, 1}, (const double[]){0.5, 0.5}, __LINE__);
    }

    /* Large logits saturate: sigmoid(100) = 1, sigmoid(-100) = 3.7e-44. */
    {
        static const float ls[] = {-100, 100, 30, -30};

        p = params(MOE_SCORE_SIGMOID, 4, 2, false);
        check_one(&p, ls, (const int32_t[]){1, 2}, (const double[]){1.0, 1.0 - 9.357623e-14},
                  __LINE__);
    }
}

/* Non-finite logits: -EINVAL naming the token. */
static void test_non_finite(void)
{
    float l[3 * 4];
    int32_t ids[3 * 2];
    float w[3 * 2];
    struct moe_error err = {0};
    static const float bad[] = {NAN, INFINITY, -INFINITY};

    for (size_t b = 0; b < MOE_ARRAY_SIZE(bad); b++) {
        for (int f = 0; f < 2; f++) {
            struct moe_router_params p =
                params(f ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX, 4, 2, true);

            for (int i = 0; i < 12; i++)
                l[i] = (float)i / 10;
            l[2 * 4 + 3] = bad[b];
            memset(&err, 0, sizeof(err));
            ASSERT_EQ(moe_route(&p, l, 3, ids, w, &err), -EINVAL);
            ASSERT_EQ(err.code, -EINVAL);
            ASSERT_CONTAINS(err.msg, "token 2");
            ASSERT_CONTAINS(err.msg, "expert 3");
            /* Without an error struct too. */
            ASSERT_EQ(moe_route(&p, l, 3, ids, w, NULL), -EINVAL);
            /* The tokens before it are fine on their own. */
            ASSERT_EQ(moe_route(&p, l, 2, ids, w, &err), 0);
        }
    }
}

/* ------------------------------------------------------------------------ */
/* The fp64 reference: full sorts in double, straight from the rules. */

struct ref_item {
    double v;
    int id;
};

/* Descending value, ties lower id first. */
static int ref_cmp(const void *a, const void *b)
{
    const struct ref_item *x = a, *y = b;

    if (x->v != y->v)
        return x->v > y->v ? -1 : 1;
    return x->id - y->id;
}

/*
 * Routes one token in double.  Returns true when the answer is fragile: the
 * k-th and (k+1)-th selection scores (or the topk_group-th and next group
 * scores, or two of the chosen weights) are within 1e-6, where fp32 may
 * legitimately decide the other way.
 */
static bool ref_route(const struct moe_router_params *p, const float *l, int32_t *ids, double *w)
{
    const int E = p->n_experts, K = p->top_k;
    struct ref_item it[MOE_MAX_EXPERTS], sel[MOE_MAX_TOP_K];
    double s[MOE_MAX_EXPERTS];
    bool fragile = false, kept[MOE_MAX_EXPERTS];
    double sum = 0;

    if (p->score_func == MOE_SCORE_SOFTMAX) {
        double m = -INFINITY;

        for (int e = 0; e < E; e++)
            m = fmax(m, l[e]);
        for (int e = 0; e < E; e++)
            sum += exp((double)l[e] - m);
        for (int e = 0; e < E; e++)
            s[e] = exp((double)l[e] - m) / sum;
        for (int e = 0; e < E; e++) {
            it[e] = (struct ref_item){s[e], e};
            kept[e] = true;
        }
        if (p->n_group > 1) {
            /* DeepSeek-V2 group_limited_greedy: a group scores its best p;
             * the dropped groups' p are masked to 0. */
            const int G = p->n_group, gs = E / G;
            struct ref_item g[MOE_MAX_EXPERTS];

            for (int gi = 0; gi < G; gi++) {
                double b = -INFINITY;

                for (int e = gi * gs; e < (gi + 1) * gs; e++)
                    b = fmax(b, s[e]);
                g[gi] = (struct ref_item){b, gi};
            }
            qsort(g, G, sizeof(*g), ref_cmp);
            if (p->topk_group < G && g[p->topk_group - 1].v - g[p->topk_group].v < 1e-6)
                fragile = true;
            for (int j = p->topk_group; j < G; j++) {
                for (int e = g[j].id * gs; e < (g[j].id + 1) * gs; e++)
                    it[e].v = 0.0;
            }
        }
    } else {
        const int G = p->n_group, gs = E / G;

        for (int e = 0; e < E; e++) {
            s[e] = 1.0 / (1.0 + exp(-(double)l[e]));
            it[e] = (struct ref_item){s[e] + (p->bias ? p->bias[e] : 0.0), e};
            kept[e] = true;
        }
        if (G > 1) {
            struct ref_item g[MOE_MAX_EXPERTS / 2], tmp[MOE_MAX_EXPERTS];

            for (int gi = 0; gi < G; gi++) {
                memcpy(tmp, it + gi * gs, gs * sizeof(*tmp));
                qsort(tmp, gs, sizeof(*tmp), ref_cmp);
                g[gi] = (struct ref_item){tmp[0].v + tmp[1].v, gi};
            }
            qsort(g, G, sizeof(*g), ref_cmp);
            if (p->topk_group < G && g[p->topk_group - 1].v - g[p->topk_group].v < 1e-6)
                fragile = true;
            for (int j = p->topk_group; j < G; j++) {
                for (int e = g[j].id * gs; e < (g[j].id + 1) * gs; e++)
                    kept[e] = false;
            }
            for (int e = 0; e < E; e++) {
                if (!kept[e])
                    it[e].v = -INFINITY;
            }
        }
    }
    qsort(it, E, sizeof(*it), ref_cmp);
    if (K < E && it[K - 1].v - it[K].v < 1e-6)
        fragile = true;

    sum = 0;
    for (int j = 0; j < K; j++)
        sum += s[it[j].id];
    for (int j = 0; j < K; j++) {
        double v = s[it[j].id];

        if (p->norm_topk_prob && p->score_func == MOE_SCORE_SOFTMAX)
            v /= sum;
        if (p->norm_topk_prob && p->score_func == MOE_SCORE_SIGMOID && K > 1)
            v /= sum + 1e-20;
        sel[j] = (struct ref_item){v * p->routed_scaling_factor, it[j].id};
    }
    qsort(sel, K, sizeof(*sel), ref_cmp);
    for (int j = 0; j < K; j++) {
        ids[j] = sel[j].id;
        w[j] = sel[j].v;
        if (j > 0 && sel[j - 1].v - sel[j].v <= 1e-6 * sel[j - 1].v)
            fragile = true;
    }
    return fragile;
}

/* Counts of what the random comparison did. */
static long n_compared, n_fragile, n_sets;

/* Routes n random tokens (logits uniform in [-scale, scale)) with p and
 * with the reference; ids must match exactly, weights to 1e-6 relative. */
static void compare_random(const struct moe_router_params *p, int n, float scale, uint64_t *rng)
{
    const int E = p->n_experts, K = p->top_k;
    float *l = malloc((size_t)n * E * sizeof(*l));
    int32_t *ids = malloc((size_t)n * K * sizeof(*ids));
    float *w = malloc((size_t)n * K * sizeof(*w));
    struct moe_error err = {0};
    long fragile = 0;
    int r;

    if (!l || !ids || !w)
        FAIL("out of memory");
    for (size_t i = 0; i < (size_t)n * E; i++)
        l[i] = test_rand_f32(rng) * scale;
    r = moe_route(p, l, n, ids, w, &err);
    if (r != 0)
        FAIL("moe_route returned %d: %s", r, err.msg);
    /* The output is always valid routing. */
    ASSERT_EQ(moe_routing_validate(E, K, n, ids, w, &err), 0);

    for (int t = 0; t < n; t++) {
        int32_t rid[MOE_MAX_TOP_K];
        double rw[MOE_MAX_TOP_K];
        const int32_t *gi = ids + (size_t)t * K;
        const float *gw = w + (size_t)t * K;

        /* Descending weights, ties by id, whatever the reference says. */
        for (int j = 1; j < K; j++) {
            if (gw[j - 1] < gw[j] || (gw[j - 1] == gw[j] && gi[j - 1] > gi[j]))
                FAIL("token %d: slots %d, %d out of order: (%d, %.9g) (%d, %.9g)", t, j - 1, j,
                     (int)gi[j - 1], (double)gw[j - 1], (int)gi[j], (double)gw[j]);
        }
        if (ref_route(p, l + (size_t)t * E, rid, rw)) {
            fragile++;
            continue;
        }
        for (int j = 0; j < K; j++) {
            if (gi[j] != rid[j] || !(fabs(gw[j] - rw[j]) <= 1e-6 * fabs(rw[j])))
                FAIL("E %d k %d norm %d %s n_group %d topk_group %d bias %s scale %g, token %d "
                     "slot %d: got (%d, %.9g), reference (%d, %.9g)",
                     E, K, p->norm_topk_prob, p->score_func ? "sigmoid" : "softmax", p->n_group,
                     p->topk_group, p->bias ? "yes" : "no", (double)p->routed_scaling_factor, t, j,
                     (int)gi[j], (double)gw[j], (int)rid[j], rw[j]);
        }
    }
    /* The comparison must not be vacuous. */
    if (fragile > n / 10 + 2)
        FAIL("E %d k %d: %ld of %d tokens are near-ties", E, K, fragile, n);
    n_compared += n - fragile;
    n_fragile += fragile;
    n_sets++;
    free(l);
    free(ids);
    free(w);
}

static void test_random_vs_reference(void)
{
    static const int Es[] = {4, 8, 16, 60, 64, 128, 256};
    static const int ks[] = {1, 2, 4, 6, 8};
    static const int groups[] = {1, 2, 3, 4, 8};
    static const float scales[] = {1.0f, 4.0f};
    static float bias[MOE_MAX_EXPERTS];
    uint64_t rng = 42, rng_groups = 4242;

    for (int e = 0; e < MOE_MAX_EXPERTS; e++)
        bias[e] = test_rand_f32(&rng) * 0.5f;

    for (size_t ei = 0; ei < MOE_ARRAY_SIZE(Es); ei++) {
        const int E = Es[ei];

        for (size_t ki = 0; ki < MOE_ARRAY_SIZE(ks); ki++) {
            const int k = ks[ki];

            if (k > E)
                continue;
            /* Softmax: with and without renormalisation, scaling. */
            for (int norm = 0; norm < 2; norm++) {
                for (size_t si = 0; si < MOE_ARRAY_SIZE(scales); si++) {
                    struct moe_router_params p = params(MOE_SCORE_SOFTMAX, E, k, norm);

                    p.routed_scaling_factor = si ? 2.5f : 1.0f;
                    compare_random(&p, 300, scales[si], &rng);
                }
            }
            /* Softmax with groups (DeepSeek-V2), groups of one included. */
            for (size_t gi = 1; gi < MOE_ARRAY_SIZE(groups); gi++) {
                const int G = groups[gi];

                if (E % G != 0)
                    continue;
                for (int tg = 1; tg < G; tg++) {
                    struct moe_router_params p = params(MOE_SCORE_SOFTMAX, E, k, false);

                    if (k > tg * (E / G) || (G > 4 && tg != 1 && tg != G / 2 && tg != G - 1))
                        continue;
                    p.n_group = G;
                    p.topk_group = tg;
                    p.routed_scaling_factor = tg == 1 ? 16.0f : 1.0f;
                    /* Its own stream: the other sets see the tokens they always saw. */
                    compare_random(&p, 200, scales[tg & 1], &rng_groups);
                }
            }
            /* Sigmoid: groups, kept groups, bias, norm, scaling. */
            for (size_t gi = 0; gi < MOE_ARRAY_SIZE(groups); gi++) {
                const int G = groups[gi];

                if (E % G != 0 || (G > 1 && E / G < 2))
                    continue;
                for (int tg = 1; tg <= G; tg++) {
                    if (G > 4 && tg != 1 && tg != G / 2 && tg != G - 1 && tg != G)
                        continue;
                    if (k > tg * (E / G))
                        continue;
                    for (int v = 0; v < 4; v++) {
                        struct moe_router_params p = params(MOE_SCORE_SIGMOID, E, k, v & 1);

                        p.n_group = G;
                        p.topk_group = tg;
                        p.bias = v & 2 ? bias : NULL;
                        p.routed_scaling_factor = v == 3 ? 2.5f : 1.0f;
                        compare_random(&p, 200, scales[v & 1], &rng);
                    }
                }
            }
        }
    }

    /* The limits: 4096 experts, top 64, and 2048 groups of 2. */
    {
        struct moe_router_params p = params(MOE_SCORE_SOFTMAX, MOE_MAX_EXPERTS, MOE_MAX_TOP_K, 1);

        compare_random(&p, 20, 4.0f, &rng);
        p = params(MOE_SCORE_SIGMOID, MOE_MAX_EXPERTS, MOE_MAX_TOP_K, 1);
        p.n_group = MOE_MAX_EXPERTS / 2;
        p.topk_group = 100;
        p.bias = bias;
        compare_random(&p, 20, 4.0f, &rng);
        p.n_group = 256;
        p.topk_group = 8;
        compare_random(&p, 20, 4.0f, &rng);
    }
    fprintf(stderr, "random: %ld parameter sets, %ld tokens compared, %ld near-ties skipped\n",
            n_sets, n_compared, n_fragile);
    ASSERT_TRUE(n_compared > 100000);
}

/*
 * Exact ties everywhere: logits from a handful of values, so many experts
 * (and groups) score the same.  The reference breaks ties towards the lower
 * id exactly as the rules say; nothing is skipped.  Positive logits only, so
 * that no two different pairs of sigmoid scores can sum to the same group
 * score (s(x) + s(-x) = 1 would, and might round differently).
 */
static void test_exact_ties(void)
{
    static const float vals[] = {0.25f, 0.5f, 1.0f, 2.0f};
    static const int Es[] = {8, 16, 64, 256};
    uint64_t rng = 7;

    for (size_t ei = 0; ei < MOE_ARRAY_SIZE(Es); ei++) {
        const int E = Es[ei], n = 200;
        float *l = malloc((size_t)n * E * sizeof(*l));

        if (!l)
            FAIL("out of memory");
        for (size_t i = 0; i < (size_t)n * E; i++)
            l[i] = vals[test_rand_u64(&rng) % MOE_ARRAY_SIZE(vals)];
        for (int v = 0; v < 6; v++) {
            struct moe_router_params p =
                params(v < 2 ? MOE_SCORE_SOFTMAX : MOE_SCORE_SIGMOID, E, 6, v & 1);
            int32_t ids[6], rid[6];
            float w[6];
            double rw[6];

            if (v >= 4) {
                p.n_group = 4;
                p.topk_group = 3;
            }
            for (int t = 0; t < n; t++) {
                ASSERT_EQ(moe_route(&p, l + (size_t)t * E, 1, ids, w, NULL), 0);
                ref_route(&p, l + (size_t)t * E, rid, rw);
                for (int j = 0; j < 6; j++) {
                    if (ids[j] != rid[j] || !(fabs(w[j] - rw[j]) <= 1e-6 * rw[j]))
                        FAIL("ties E %d variant %d token %d slot %d: (%d, %.9g), reference "
                             "(%d, %.9g)",
                             E, v, t, j, (int)ids[j], (double)w[j], (int)rid[j], rw[j]);
                }
            }
        }
        free(l);
    }
}

/* ------------------------------------------------------------------------ */

static const float nan_bias[8] = {0, 0, 0, NAN, 0, 0, 0, 0};
static const float ok_bias[MOE_MAX_EXPERTS];

static const struct bad_params {
    struct moe_router_params p;
    const char *msg;
} bad_params[] = {
    /* score_func n_experts top_k norm n_group topk_group scaling bias */
    {{7, 8, 2, true, 1, 1, 1.0f, NULL}, "score_func is 7"},
    {{MOE_SCORE_SOFTMAX, 0, 1, true, 1, 1, 1.0f, NULL}, "n_experts is 0, expected 1..4096"},
    {{MOE_SCORE_SOFTMAX, -3, 1, true, 1, 1, 1.0f, NULL}, "n_experts is -3"},
    {{MOE_SCORE_SOFTMAX, 4097, 1, true, 1, 1, 1.0f, NULL}, "n_experts is 4097"},
    {{MOE_SCORE_SOFTMAX, 8, 0, true, 1, 1, 1.0f, NULL}, "top_k is 0, expected 1..8"},
    {{MOE_SCORE_SOFTMAX, 4, 5, true, 1, 1, 1.0f, NULL}, "top_k is 5, expected 1..4"},
    {{MOE_SCORE_SOFTMAX, 128, 65, true, 1, 1, 1.0f, NULL}, "top_k is 65, expected 1..64"},
    {{MOE_SCORE_SIGMOID, 8, 2, true, 0, 1, 1.0f, NULL}, "n_group is 0"},
    {{MOE_SCORE_SIGMOID, 8, 2, true, -2, 1, 1.0f, NULL}, "n_group is -2"},
    {{MOE_SCORE_SIGMOID, 8, 2, true, 3, 1, 1.0f, NULL}, "n_group is 3, expected a divisor"},
    {{MOE_SCORE_SIGMOID, 8, 1, true, 8, 1, 1.0f, NULL}, "groups of 1 expert"},
    {{MOE_SCORE_SOFTMAX, 8, 2, true, 3, 1, 1.0f, NULL}, "n_group is 3, expected a divisor"},
    {{MOE_SCORE_SOFTMAX, 8, 3, false, 4, 1, 1.0f, NULL}, "top_k is 3, but topk_group 1 groups"},
    {{MOE_SCORE_SIGMOID, 8, 2, true, 4, 0, 1.0f, NULL}, "topk_group is 0, expected 1..n_group 4"},
    {{MOE_SCORE_SIGMOID, 8, 2, true, 4, 5, 1.0f, NULL}, "topk_group is 5"},
    {{MOE_SCORE_SOFTMAX, 8, 2, true, 1, 2, 1.0f, NULL}, "topk_group is 2, expected 1..n_group 1"},
    {{MOE_SCORE_SIGMOID, 8, 5, true, 4, 2, 1.0f, NULL}, "top_k is 5, but topk_group 2 groups"},
    {{MOE_SCORE_SIGMOID, 8, 2, true, 1, 1, 0.0f, NULL}, "routed_scaling_factor is 0"},
    {{MOE_SCORE_SIGMOID, 8, 2, true, 1, 1, -1.0f, NULL}, "routed_scaling_factor is -1"},
    {{MOE_SCORE_SIGMOID, 8, 2, true, 1, 1, NAN, NULL}, "routed_scaling_factor is nan"},
    {{MOE_SCORE_SOFTMAX, 8, 2, true, 1, 1, INFINITY, NULL}, "routed_scaling_factor is inf"},
    {{MOE_SCORE_SOFTMAX, 8, 2, true, 1, 1, 1.0f, ok_bias}, "bias is set with softmax"},
    {{MOE_SCORE_SIGMOID, 8, 2, true, 1, 1, 1.0f, nan_bias}, "bias[3] is nan"},
};

static void test_bad_params(void)
{
    float l[8] = {0};
    int32_t ids[64];
    float w[64];

    for (size_t i = 0; i < MOE_ARRAY_SIZE(bad_params); i++) {
        struct moe_error err = {0};

        if (moe_router_check(&bad_params[i].p, &err) != -EINVAL)
            FAIL("bad_params[%zu] (%s) was accepted", i, bad_params[i].msg);
        ASSERT_EQ(err.code, -EINVAL);
        ASSERT_CONTAINS(err.msg, bad_params[i].msg);
        /* moe_route refuses them the same way, before touching anything. */
        memset(&err, 0, sizeof(err));
        ASSERT_EQ(moe_route(&bad_params[i].p, l, 1, ids, w, &err), -EINVAL);
        ASSERT_CONTAINS(err.msg, bad_params[i].msg);
    }
    ASSERT_EQ(moe_router_check(NULL, NULL), -EINVAL);

    /* Good ones, including the edges. */
    {
        static const struct moe_router_params good[] = {
            {MOE_SCORE_SOFTMAX, 1, 1, true, 1, 1, 1.0f, NULL},
            {MOE_SCORE_SOFTMAX, 4096, 64, false, 1, 1, 1.0f, NULL},
            {MOE_SCORE_SIGMOID, 256, 8, true, 8, 4, 2.5f, ok_bias},
            {MOE_SCORE_SIGMOID, 8, 4, true, 4, 2, 2.5f, ok_bias},
            {MOE_SCORE_SIGMOID, 8, 8, true, 4, 4, 1.0f, NULL},
            {MOE_SCORE_SIGMOID, 4096, 64, true, 2048, 32, 1.0f, NULL},
            {MOE_SCORE_SIGMOID, 3, 1, false, 1, 1, 1e-3f, NULL},
        };

        for (size_t i = 0; i < MOE_ARRAY_SIZE(good); i++) {
            struct moe_error err = {0};

            if (moe_router_check(&good[i], &err) != 0)
                FAIL("good[%zu] refused: %s", i, err.msg);
        }
    }

    /* Token count and pointers. */
    {
        struct moe_router_params p = params(MOE_SCORE_SOFTMAX, 8, 2, true);
        struct moe_error err = {0};

        ASSERT_EQ(moe_route(&p, l, -1, ids, w, &err), -EINVAL);
        ASSERT_CONTAINS(err.msg, "token count is -1");
        ASSERT_EQ(moe_route(&p, NULL, 0, NULL, NULL, &err), 0);
        ASSERT_EQ(moe_route(&p, NULL, 1, ids, w, &err), -EINVAL);
        ASSERT_CONTAINS(err.msg, "NULL");
    }
}

static void test_bad_routing(void)
{
    /* 3 tokens, top 3, 8 experts. */
    static const int32_t good_ids[9] = {0, 1, 2, 7, 6, 5, 3, 0, 4};
    static const float good_w[9] = {0.5f, 0.3f, 0.2f, 1, 0, -1, 2, 2, 2};
    static const struct {
        int slot;   /* index into the 9 */
        int32_t id; /* new id there, or -100 to keep */
        float w;    /* new weight there */
        const char *msg;
    } bad[] = {
        {4, -1, 1, "token 1 slot 1: expert id -1 is out of range, expected 0..7"},
        {4, 8, 1, "token 1 slot 1: expert id 8 is out of range"},
        {8, INT32_MIN, 1, "token 2 slot 2: expert id -2147483648"},
        {5, 7, 1, "token 1 slot 2: expert id 7 is already in slot 0"},
        {1, 0, 1, "token 0 slot 1: expert id 0 is already in slot 0"},
        {7, -100, NAN, "token 2 slot 1: weight nan is not finite"},
        {3, -100, INFINITY, "token 1 slot 0: weight inf is not finite"},
        {2, -100, -INFINITY, "token 0 slot 2: weight -inf"},
    };
    struct moe_error err = {0};

    ASSERT_EQ(moe_routing_validate(8, 3, 3, good_ids, good_w, &err), 0);
    ASSERT_EQ(moe_routing_validate(8, 3, 0, NULL, NULL, &err), 0);
    for (size_t i = 0; i < MOE_ARRAY_SIZE(bad); i++) {
        int32_t ids[9];
        float w[9];

        memcpy(ids, good_ids, sizeof(ids));
        memcpy(w, good_w, sizeof(w));
        if (bad[i].id != -100)
            ids[bad[i].slot] = bad[i].id;
        w[bad[i].slot] = bad[i].w;
        memset(&err, 0, sizeof(err));
        if (moe_routing_validate(8, 3, 3, ids, w, &err) != -EINVAL)
            FAIL("bad routing %zu (%s) was accepted", i, bad[i].msg);
        ASSERT_EQ(err.code, -EINVAL);
        ASSERT_CONTAINS(err.msg, bad[i].msg);
        ASSERT_EQ(moe_routing_validate(8, 3, 3, ids, w, NULL), -EINVAL);
    }

    /* Bad shapes. */
    ASSERT_EQ(moe_routing_validate(0, 1, 1, good_ids, good_w, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "n_experts is 0");
    ASSERT_EQ(moe_routing_validate(8, 9, 1, good_ids, good_w, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "top_k is 9");
    ASSERT_EQ(moe_routing_validate(8, 0, 1, good_ids, good_w, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "top_k is 0");
    ASSERT_EQ(moe_routing_validate(8, 3, -1, good_ids, good_w, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "token count is -1");
    ASSERT_EQ(moe_routing_validate(8, 3, 1, NULL, good_w, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "expert ids are NULL");
    ASSERT_EQ(moe_routing_validate(8, 3, 1, good_ids, NULL, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "weights are NULL");
}

/* Not a benchmark: prints the cost of a DeepSeek-V3-shaped routing. */
static void test_speed(void)
{
    enum { N = 4096, E = 256, K = 8 };
    struct moe_router_params p = params(MOE_SCORE_SIGMOID, E, K, true);
    static float l[N * E], bias[E];
    static int32_t ids[N * K];
    static float w[N * K];
    uint64_t rng = 3, t0, t1, t2;

    for (int i = 0; i < N * E; i++)
        l[i] = test_rand_f32(&rng) * 4;
    for (int i = 0; i < E; i++)
        bias[i] = test_rand_f32(&rng);
    p.n_group = 8;
    p.topk_group = 4;
    p.bias = bias;
    p.routed_scaling_factor = 2.5f;
    /* Once to fault the pages in. */
    ASSERT_EQ(moe_route(&p, l, N, ids, w, NULL), 0);
    t0 = moe_now_ns();
    ASSERT_EQ(moe_route(&p, l, N, ids, w, NULL), 0);
    t1 = moe_now_ns();
    p = params(MOE_SCORE_SOFTMAX, E, K, true);
    ASSERT_EQ(moe_route(&p, l, N, ids, w, NULL), 0);
    t2 = moe_now_ns();
    fprintf(stderr, "speed: E %d k %d: sigmoid with groups %.0f ns/token, softmax %.0f ns/token\n",
            E, K, (double)(t1 - t0) / N, (double)(t2 - t1) / N);
}

/*
 * Llama 4: the top-k logits, each weighted by its own sigmoid (no softmax,
 * no renormalisation); logits where sigmoid rounds to 1 in fp32 still keep
 * their order; the rule refuses renormalisation, groups and scaling.
 */
static void test_topk_sigmoid_cases(void)
{
    struct moe_router_params p = params(MOE_SCORE_TOPK_SIGMOID, 6, 2, false);
    struct moe_error err = {0};
    const float l1[6] = {0.5f, -1.0f, 2.0f, 1.5f, -3.0f, 0.0f};
    const int32_t i1[2] = {2, 3};
    const double w1[2] = {1.0 / (1.0 + exp(-2.0)), 1.0 / (1.0 + exp(-1.5))};
    const float l2[6] = {30.0f, 40.0f, 20.0f, -5.0f, 0.0f, 35.0f};
    const int32_t i2[2] = {1, 5};
    const double w2[2] = {1.0, 1.0};

    check_one(&p, l1, i1, w1, __LINE__);
    check_one(&p, l2, i2, w2, __LINE__);
    p.top_k = 1;
    check_one(&p, l1, i1, w1, __LINE__);
    p.top_k = 2;
    p.norm_topk_prob = true;
    ASSERT_EQ(moe_router_check(&p, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "Llama 4's rule has none of them");
    p.norm_topk_prob = false;
    p.n_group = 2;
    ASSERT_EQ(moe_router_check(&p, &err), -EINVAL);
}

int main(void)
{
    test_topk_sigmoid_cases();
    test_softmax_cases();
    test_softmax_groups_case();
    test_sigmoid_cases();
    test_non_finite();
    test_bad_params();
    test_bad_routing();
    test_exact_ties();
    test_random_vs_reference();
    test_speed();
    return 0;
}
