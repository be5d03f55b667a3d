/*
 * Expert placement over several GPUs (kernels/placement.c), without a GPU:
 * every expert placed once (hot ones on distinct devices when replicated),
 * per-layer load balanced by the greedy, capacities respected, deterministic
 * maps, pick() spreading tokens over copies, and errors for bad input and
 * for experts that fit nowhere.
 */
#include "placement.h"
#include "tests.h"

#include <errno.h>

static uint64_t rng(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Every expert is on 1..copies distinct devices, ascending, and the
 * per-device bytes add up. */
static void check_map(const struct moe_placement_input *in, const struct moe_placement *p)
{
    uint64_t bytes[MOE_PLACE_MAX_DEVICES] = {0};
    size_t n = (size_t)in->n_layers * in->n_experts;

    for (size_t x = 0; x < n; x++) {
        const int16_t *dv = p->dev + x * MOE_PLACE_MAX_REPLICAS;

        ASSERT_TRUE(p->n_copies[x] >= 1 && p->n_copies[x] <= MOE_PLACE_MAX_REPLICAS);
        for (int c = 0; c < p->n_copies[x]; c++) {
            ASSERT_TRUE(dv[c] >= 0 && dv[c] < in->n_devices);
            if (c > 0)
                ASSERT_TRUE(dv[c - 1] < dv[c]);
            bytes[dv[c]] += in->bytes ? in->bytes[x] : in->bytes_each;
        }
    }
    for (int d = 0; d < in->n_devices; d++) {
        ASSERT_EQ(bytes[d], p->dev_bytes[d]);
        if (in->capacity && in->capacity[d])
            ASSERT_TRUE(p->dev_bytes[d] <= in->capacity[d]);
    }
}

static void check_balance(void)
{
    /* Zipf-like loads: 4 layers x 64 experts over 4 devices. */
    enum { L = 4, E = 64, D = 4 };
    double load[L * E];
    uint64_t s = 7;
    struct moe_placement_input in = {
        .n_layers = L, .n_experts = E, .load = load, .bytes_each = 1 << 20, .n_devices = D};
    struct moe_placement *p, *q;
    struct moe_error err = {0};

    for (int i = 0; i < L * E; i++)
        load[i] = 1000.0 / (1 + (double)(rng(&s) % 64));
    ASSERT_EQ(moe_placement_compute(&in, &p, &err), 0);
    check_map(&in, p);
    double imb = moe_placement_imbalance(p);
    printf("4 devices, Zipf loads: worst layer max/mean %.3f\n", imb);
    ASSERT_TRUE(imb < 1.10);
    for (int x = 0; x < L * E; x++)
        ASSERT_EQ(p->n_copies[x], 1);
    /* Each device holds a quarter of the experts' bytes, give or take. */
    for (int d = 0; d < D; d++)
        ASSERT_TRUE(p->dev_bytes[d] >= (uint64_t)(L * E / D / 2) << 20);
    /* Deterministic. */
    ASSERT_EQ(moe_placement_compute(&in, &q, &err), 0);
    ASSERT_TRUE(memcmp(p->dev, q->dev, (size_t)L * E * MOE_PLACE_MAX_REPLICAS * 2) == 0);
    moe_placement_free(q);
    moe_placement_free(p);

    /* One device: everything on it. */
    in.n_devices = 1;
    ASSERT_EQ(moe_placement_compute(&in, &p, &err), 0);
    for (int x = 0; x < L * E; x++)
        ASSERT_EQ(moe_placement_pick(p, x / E, x % E, (uint32_t)x), 0);
    ASSERT_TRUE(moe_placement_imbalance(p) == 1.0);
    moe_placement_free(p);
}

static void check_replicas(void)
{
    /* One very hot expert per layer: replicated on 2 devices, tokens
     * alternate between its copies. */
    enum { L = 2, E = 8, D = 2 };
    double load[L * E];
    struct moe_placement_input in = {.n_layers = L,
                                     .n_experts = E,
                                     .load = load,
                                     .bytes_each = 4096,
                                     .n_devices = D,
                                     .n_replicated = 2,
                                     .max_replicas = 4};
    struct moe_placement *p;
    struct moe_error err = {0};

    for (int i = 0; i < L * E; i++)
        load[i] = 1.0;
    load[3] = 100.0;
    load[E + 5] = 90.0;
    ASSERT_EQ(moe_placement_compute(&in, &p, &err), 0);
    check_map(&in, p);
    ASSERT_EQ(p->n_copies[3], 2); /* capped at n_devices */
    ASSERT_EQ(p->n_copies[E + 5], 2);
    ASSERT_EQ(p->n_copies[0], 1);
    ASSERT_TRUE(moe_placement_pick(p, 0, 3, 0) != moe_placement_pick(p, 0, 3, 1));
    ASSERT_EQ(moe_placement_pick(p, 0, 3, 0), moe_placement_pick(p, 0, 3, 2));
    /* The hot expert's load is split, so each layer stays balanced. */
    ASSERT_TRUE(moe_placement_imbalance(p) < 1.10);
    ASSERT_EQ(moe_placement_pick(p, 2, 0, 0), -1);
    ASSERT_EQ(moe_placement_pick(p, 0, E, 0), -1);
    moe_placement_free(p);
}

static void check_capacity(void)
{
    enum { L = 1, E = 10, D = 2 };
    uint64_t bytes[E], cap[D] = {7000, 0};
    struct moe_placement_input in = {
        .n_layers = L, .n_experts = E, .bytes = bytes, .n_devices = D, .capacity = cap};
    struct moe_placement *p;
    struct moe_error err = {0};

    for (int i = 0; i < E; i++)
        bytes[i] = 1000;
    /* Device 0 holds at most 7 experts, device 1 has no limit. */
    ASSERT_EQ(moe_placement_compute(&in, &p, &err), 0);
    check_map(&in, p);
    moe_placement_free(p);
    cap[0] = 3000;
    cap[1] = 3000;
    ASSERT_EQ(moe_placement_compute(&in, &p, &err), -ENOSPC);
    ASSERT_CONTAINS(err.msg, "fits on no device");
    /* Exactly enough room. */
    cap[0] = 5000;
    cap[1] = 5000;
    ASSERT_EQ(moe_placement_compute(&in, &p, &err), 0);
    ASSERT_EQ(p->dev_bytes[0], 5000);
    ASSERT_EQ(p->dev_bytes[1], 5000);
    moe_placement_free(p);
}

static void check_errors(void)
{
    static const struct {
        int layers, experts, devices, replicated, max_replicas;
        const char *msg;
    } cases[] = {
        {0, 8, 2, 0, 0, "0 layers"},
        {2, 0, 2, 0, 0, "0 experts"},
        {2, 8, 0, 0, 0, "0 devices"},
        {2, 8, MOE_PLACE_MAX_DEVICES + 1, 0, 0, "expected 1 to"},
        {2, 8, 2, 17, 2, "to replicate"},
        {2, 8, 2, 1, 0, "max_replicas 0"},
        {2, 8, 2, 1, MOE_PLACE_MAX_REPLICAS + 1, "max_replicas"},
    };
    struct moe_error err = {0};
    struct moe_placement *p = NULL;
    double load[4] = {1, 2, -1, 3};

    for (size_t i = 0; i < MOE_ARRAY_SIZE(cases); i++) {
        struct moe_placement_input in = {.n_layers = cases[i].layers,
                                         .n_experts = cases[i].experts,
                                         .bytes_each = 1,
                                         .n_devices = cases[i].devices,
                                         .n_replicated = cases[i].replicated,
                                         .max_replicas = cases[i].max_replicas};

        ASSERT_EQ(moe_placement_compute(&in, &p, &err), -EINVAL);
        ASSERT_CONTAINS(err.msg, cases[i].msg);
    }
    struct moe_placement_input in = {
        .n_layers = 1, .n_experts = 4, .load = load, .bytes_each = 1, .n_devices = 2};
    ASSERT_EQ(moe_placement_compute(&in, &p, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "expert 2");
    ASSERT_EQ(moe_placement_compute(NULL, &p, &err), -EINVAL);
    moe_placement_free(NULL);
}

int main(void)
{
    check_balance();
    check_replicas();
    check_capacity();
    check_errors();
    printf("ok\n");
    return 0;
}
