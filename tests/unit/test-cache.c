/*
 * The expert cache (engine/cache.c, policy.c, tier.c):
 *   - the arena allocator against a bitmap model;
 *   - lru hit counts against a reference LRU written here, on random
 *     multi-layer batches held together;
 *   - batches: with every policy, an expert resident when its batch starts
 *     is a hit (making room for the others never evicts it); a batch larger
 *     than the room keeps the prefix that fits and defers the rest, leaving
 *     its resident experts where they are; in two tiers, a batch's expert
 *     in the host tier only is not evicted there by another's page-in;
 *   - pins: batch pins and operator pins survive eviction pressure, -ENOSPC
 *     when everything is pinned, evict/unpin/retry;
 *   - prefetch: a learned layer-to-layer rule turns into prefetch hits;
 *     the throttle's rule as a table; its calibration stops prefetches of
 *     a rule that stopped holding;
 *   - real page-ins from a generated checkpoint: bytes equal the file's,
 *     single flight under concurrent acquires, statistics;
 *   - failures through the pager's fault injection (EIO, short reads, a
 *     flipped byte caught by a packed store's checksum) and a really
 *     truncated file: the expert is marked bad, the others served, retry
 *     clears the mark;
 *   - lookahead routing learned as far as it is right, turned into prefetch
 *     hits;
 *   - two tiers: an expert evicted from the front tier comes back from the
 *     one behind it without I/O;
 *   - shrinking the capacity evicts down to it;
 *   - adaptive: removing a model and switching policies leave its shadows
 *     sound (the hit rates against lru are test-trace's).
 */
#include "cache.h"
#include "genmodel.h"
#include "model.h"
#include "pack.h"
#include "pager.h"
#include "tier.h"
#include "tests.h"

#include <errno.h>
#include <pthread.h>
#include <unistd.h>

/* ---- arena ---------------------------------------------------------------------------------- */

static void check_arena(void)
{
    enum { UNITS = 256 };
    struct moe_arena a;
    uint8_t used[UNITS] = {0};
    uint64_t offs[64], lens[64];
    int n = 0;
    uint64_t seed = 3;

    ASSERT_EQ(moe_arena_init(&a, UNITS), 0);
    for (int step = 0; step < 20000; step++) {
        if (n < 64 && (test_rand_u64(&seed) % 3 != 0 || n == 0)) {
            uint64_t len = 1 + test_rand_u64(&seed) % 24, off;
            int r = moe_arena_alloc(&a, len, &off);

            if (r == 0) {
                ASSERT_TRUE(off + len <= UNITS);
                for (uint64_t i = off; i < off + len; i++) {
                    ASSERT_EQ(used[i], 0);
                    used[i] = 1;
                }
                offs[n] = off;
                lens[n++] = len;
            } else {
                /* first fit: no free run of len units may exist */
                uint64_t run = 0, best = 0;

                ASSERT_EQ(r, -ENOSPC);
                for (int i = 0; i < UNITS; i++) {
                    run = used[i] ? 0 : run + 1;
                    best = MOE_MAX(best, run);
                }
                ASSERT_TRUE(best < len);
            }
        } else {
            int k = (int)(test_rand_u64(&seed) % (uint64_t)n);

            moe_arena_free(&a, offs[k], lens[k]);
            for (uint64_t i = offs[k]; i < offs[k] + lens[k]; i++)
                used[i] = 0;
            offs[k] = offs[n - 1];
            lens[k] = lens[--n];
        }
        uint64_t u = 0;

        for (int i = 0; i < UNITS; i++)
            u += used[i];
        ASSERT_EQ(a.used, u);
        for (size_t i = 1; i < a.n; i++)
            ASSERT_TRUE(a.free[i - 1].off + a.free[i - 1].len < a.free[i].off);
    }
    moe_arena_clear(&a);
}

/* ---- simulation ----------------------------------------------------------------------------- */

static struct moe_cache *sim_cache(enum moe_cache_policy p, bool prefetch, int capacity,
                                   int n_layers, int n_experts, int top_k, int *model)
{
    struct moe_cache_config cfg = {
        .host_bytes = (uint64_t)capacity * 4096,
        .policy = p,
        .prefetch = prefetch,
        .simulate = true,
    };
    struct moe_cache *c;
    struct moe_error err;

    if (moe_cache_create(&cfg, &c, &err) < 0)
        FAIL("cache: %s", err.msg);
    if (moe_cache_add_shape(c, "sim", n_layers, n_experts, top_k, 4096, model, &err) < 0)
        FAIL("shape: %s", err.msg);
    return c;
}

/*
 * A reference LRU over keys, capacity cap, for a step using the m distinct
 * keys step[]: they are held together (a resident one is a hit whatever the
 * step pages in), each miss evicts the least recently used key not of the
 * step, and then the step's keys are the most recently used, in their
 * order.  Returns the hits.
 */
static int ref_lru_step(int *keys, uint64_t *stamp, int *n, int cap, const int *step, int m,
                        uint64_t now)
{
    int hits = 0;
    bool miss[16];

    /* First hold the resident ones, */
    for (int j = 0; j < m; j++) {
        miss[j] = true;
        for (int i = 0; i < *n; i++)
            if (keys[i] == step[j]) {
                hits++;
                miss[j] = false;
                stamp[i] = UINT64_MAX;
            }
    }
    /* then make room for the others. */
    for (int j = 0; j < m; j++) {
        int at = -1;

        if (!miss[j])
            continue;
        if (*n < cap) {
            at = (*n)++;
        } else {
            for (int i = 0; i < *n; i++)
                if (stamp[i] != UINT64_MAX && (at < 0 || stamp[i] < stamp[at]))
                    at = i;
            ASSERT_TRUE(at >= 0);
        }
        keys[at] = step[j];
        stamp[at] = UINT64_MAX;
    }
    for (int j = 0; j < m; j++)
        for (int i = 0; i < *n; i++)
            if (keys[i] == step[j])
                stamp[i] = now * 16 + (uint64_t)j;
    return hits;
}

/* Random steps of 1 to 4 distinct experts of one of 3 layers of 8, as a
 * batch acquires them: hits as the reference LRU counts them. */
static void check_lru_reference(void)
{
    for (int trial = 0; trial < 20; trial++) {
        uint64_t seed = 100 + (uint64_t)trial;
        int cap = 4 + trial % 7, model, n = 0, hits = 0, ref_hits = 0, accesses = 0;
        struct moe_cache *c = sim_cache(MOE_POLICY_LRU, false, cap, 3, 8, 2, &model);
        int keys[16];
        uint64_t stamp[16];
        struct moe_cache_stats s;

        for (uint64_t now = 1; now <= 2000; now++) {
            int layer = (int)(test_rand_u64(&seed) % 3);
            int m = 1 + (int)(test_rand_u64(&seed) % 4), step[4];
            int32_t ex[4];
            struct moe_cache_ref refs[4];

            for (int j = 0; j < m; j++) {
                bool dup;

                do {
                    /* skewed towards low ids, so that there is reuse */
                    uint64_t u = test_rand_u64(&seed) % 64;

                    ex[j] = (int32_t)(u * u / 512);
                    dup = false;
                    for (int q = 0; q < j; q++)
                        dup |= ex[q] == ex[j];
                } while (dup);
                step[j] = layer * 8 + ex[j];
            }
            ASSERT_EQ(moe_cache_acquire(c, model, layer, ex, m, refs, NULL), 0);
            for (int j = 0; j < m; j++) {
                ASSERT_EQ(refs[j].status, 0);
                hits += refs[j].hit;
            }
            moe_cache_release(c, refs, m);
            ref_hits += ref_lru_step(keys, stamp, &n, cap, step, m, now);
            accesses += m;
            ASSERT_EQ(hits, ref_hits);
        }
        ASSERT_EQ(moe_cache_snapshot(c, &s), 0);
        ASSERT_EQ(s.total.hits, (uint64_t)hits);
        ASSERT_EQ(s.total.misses, (uint64_t)(accesses - hits));
        ASSERT_EQ(s.tiers[0].resident, (uint64_t)cap);
        ASSERT_EQ(s.tiers[0].used, (uint64_t)cap * 4096);
        moe_cache_stats_clear(&s);
        moe_cache_free(c);
    }
}

/*
 * Every policy, with and without prefetch, on random multi-layer batches: a
 * batch that fits gets all its experts, and each one resident when the
 * batch starts is a hit (none is evicted to make room for another of the
 * same batch).
 */
static void check_batch_held(void)
{
    for (int p = 0; p < MOE_POLICY_COUNT; p++)
        for (int pf = 0; pf < 2; pf++) {
            uint64_t seed = 40 + (uint64_t)(2 * p + pf);
            int model, cap = 6;
            struct moe_cache *c = sim_cache((enum moe_cache_policy)p, pf, cap, 4, 8, 2, &model);
            uint64_t hits = 0, was_resident = 0;

            for (int t = 0; t < 3000; t++) {
                int layer = t % 4, m = 1 + (int)(test_rand_u64(&seed) % 6);
                int32_t ex[6], ids[6];
                struct moe_cache_ref refs[6];
                bool res[6];

                for (int j = 0; j < m; j++) {
                    bool dup;

                    do {
                        ex[j] = (int32_t)(test_rand_u64(&seed) % 8);
                        dup = false;
                        for (int q = 0; q < j; q++)
                            dup |= ex[q] == ex[j];
                    } while (dup);
                    res[j] = moe_cache_resident(c, model, layer, ex[j]);
                    was_resident += res[j];
                }
                ASSERT_EQ(moe_cache_acquire(c, model, layer, ex, m, refs, NULL), 0);
                for (int j = 0; j < m; j++) {
                    ASSERT_EQ(refs[j].status, 0);
                    ASSERT_EQ(refs[j].hit, res[j]);
                    hits += refs[j].hit;
                }
                /* one token's routing when it has two experts */
                if (m == 2) {
                    ids[0] = ex[0];
                    ids[1] = ex[1];
                    moe_cache_observe(c, model, layer, ids, 1, 2);
                }
                moe_cache_release(c, refs, m);
            }
            ASSERT_EQ(hits, was_resident);
            ASSERT_TRUE(hits > 0);
            moe_cache_free(c);
        }
}

/*
 * A batch larger than the room: it keeps the longest prefix that fits and
 * defers the rest (-ENOSPC, not pinned), without evicting its own resident
 * experts after the stop; acquiring the rest once the prefix is released
 * finds them still resident.  A batch whose first expert finds no room lets
 * go of its last ones until it fits.
 */
static void check_batch_too_large(void)
{
    for (int p = 0; p < MOE_POLICY_COUNT; p++) {
        int model;
        struct moe_cache *c = sim_cache((enum moe_cache_policy)p, false, 3, 2, 8, 2, &model);
        struct moe_cache_ref refs[5];
        int32_t warm[2] = {3, 4}, batch[5] = {0, 1, 2, 3, 4};
        struct moe_cache_stats s;

        ASSERT_EQ(moe_cache_acquire(c, model, 0, warm, 2, refs, NULL), 0);
        moe_cache_release(c, refs, 2);
        /* 3 and 4 resident, room for one more: 0 fits, 1 does not. */
        ASSERT_EQ(moe_cache_acquire(c, model, 0, batch, 5, refs, NULL), 0);
        ASSERT_EQ(refs[0].status, 0);
        ASSERT_TRUE(!refs[0].hit);
        for (int j = 1; j < 5; j++) {
            ASSERT_EQ(refs[j].status, -ENOSPC);
            ASSERT_TRUE(!refs[j].pinned_);
        }
        ASSERT_TRUE(moe_cache_resident(c, model, 0, 3));
        ASSERT_TRUE(moe_cache_resident(c, model, 0, 4));
        ASSERT_EQ(moe_cache_snapshot(c, &s), 0);
        ASSERT_EQ(s.total.hits + s.total.misses, 2u + 1u); /* deferred ones not counted */
        ASSERT_EQ(s.models[0].experts[0].refs, 1u);
        ASSERT_EQ(s.models[0].experts[3].refs, 0u);
        moe_cache_stats_clear(&s);
        /* The caller computes expert 0, releases, asks for the rest. */
        moe_cache_release(c, refs, 5);
        ASSERT_EQ(moe_cache_acquire(c, model, 0, batch + 1, 4, refs + 1, NULL), 0);
        ASSERT_EQ(refs[1].status, 0);
        for (int j = 2; j < 5; j++)
            ASSERT_EQ(refs[j].status, -ENOSPC);
        ASSERT_TRUE(moe_cache_resident(c, model, 0, 3));
        ASSERT_TRUE(moe_cache_resident(c, model, 0, 4));
        moe_cache_release(c, refs + 1, 4);
        ASSERT_EQ(moe_cache_acquire(c, model, 0, batch + 2, 3, refs + 2, NULL), 0);
        for (int j = 2; j < 5; j++)
            ASSERT_EQ(refs[j].status, 0);
        ASSERT_TRUE(!refs[2].hit && refs[3].hit && refs[4].hit);
        moe_cache_release(c, refs + 2, 3);
        /* 2, 3, 4 resident: a batch 5, 2, 3, 4 gives up 4 to get 5 in. */
        {
            int32_t b2[4] = {5, 2, 3, 4};

            ASSERT_EQ(moe_cache_acquire(c, model, 0, b2, 4, refs, NULL), 0);
            ASSERT_EQ(refs[0].status, 0);
            ASSERT_TRUE(!refs[0].hit);
            ASSERT_TRUE(refs[1].hit && refs[1].status == 0);
            ASSERT_TRUE(refs[2].hit && refs[2].status == 0);
            ASSERT_EQ(refs[3].status, -ENOSPC);
            ASSERT_TRUE(!moe_cache_resident(c, model, 0, 4));
            moe_cache_release(c, refs, 4);
        }
        moe_cache_free(c);
    }
}

static void check_pins(void)
{
    for (int p = 0; p < MOE_POLICY_COUNT; p++) {
        int model;
        struct moe_cache *c = sim_cache((enum moe_cache_policy)p, false, 3, 2, 8, 2, &model);
        struct moe_cache_ref refs[3], r2;
        int32_t ex3[3] = {0, 1, 2}, ex = 5;
        struct moe_error err;
        struct moe_cache_stats s;

        /* A batch holds 3: a fourth expert finds no room. */
        ASSERT_EQ(moe_cache_acquire(c, model, 0, ex3, 3, refs, &err), 0);
        ASSERT_EQ(moe_cache_acquire(c, model, 1, &ex, 1, &r2, &err), 0);
        ASSERT_EQ(r2.status, -ENOSPC);
        ASSERT_EQ(moe_cache_wait(c, &r2, &err), -ENOSPC);
        ASSERT_CONTAINS(err.msg, "no room");
        /* Evicting an expert in use is refused. */
        ASSERT_EQ(moe_cache_evict(c, model, 0, 1, &err), -EBUSY);
        ASSERT_CONTAINS(err.msg, "in use");
        moe_cache_release(c, refs, 3);
        ASSERT_EQ(moe_cache_acquire(c, model, 1, &ex, 1, &r2, &err), 0);
        ASSERT_EQ(r2.status, 0);
        moe_cache_release(c, &r2, 1);

        /* An operator pin survives a stream of other experts. */
        ASSERT_EQ(moe_cache_pin(c, model, 1, 7, &err), 0);
        for (int i = 0; i < 200; i++) {
            int32_t x = i % 7;

            ASSERT_EQ(moe_cache_acquire(c, model, i % 2, &x, 1, &r2, &err), 0);
            ASSERT_EQ(r2.status, 0);
            moe_cache_release(c, &r2, 1);
        }
        ASSERT_EQ(moe_cache_snapshot(c, &s), 0);
        ASSERT_EQ(s.models[0].experts[1 * 8 + 7].tier, 0);
        ASSERT_TRUE(s.models[0].experts[1 * 8 + 7].operator_pinned);
        moe_cache_stats_clear(&s);
        ASSERT_EQ(moe_cache_evict(c, model, 1, 7, &err), -EBUSY);
        ASSERT_CONTAINS(err.msg, "unpin");
        ASSERT_EQ(moe_cache_unpin(c, model, 1, 7, &err), 0);
        ASSERT_TRUE(moe_cache_resident(c, model, 1, 7));
        ASSERT_EQ(moe_cache_evict(c, model, 1, 7, &err), 0);
        ASSERT_TRUE(!moe_cache_resident(c, model, 1, 7));
        ASSERT_TRUE(!moe_cache_resident(c, model, 1, 8)); /* no such expert */
        ASSERT_TRUE(!moe_cache_resident(c, model, 9, 0)); /* no such layer */
        ASSERT_TRUE(!moe_cache_resident(c, 99, 0, 0));    /* no such model */
        ASSERT_EQ(moe_cache_snapshot(c, &s), 0);
        ASSERT_EQ(s.models[0].experts[1 * 8 + 7].tier, -1);
        moe_cache_stats_clear(&s);

        /* Bad calls. */
        ASSERT_EQ(moe_cache_acquire(c, model, 2, &ex, 1, &r2, &err), -EINVAL);
        ASSERT_CONTAINS(err.msg, "out of range");
        ex = 8;
        ASSERT_EQ(moe_cache_acquire(c, model, 0, &ex, 1, &r2, &err), -EINVAL);
        ASSERT_CONTAINS(err.msg, "expert 8");
        int32_t twice[2] = {1, 1};
        ASSERT_EQ(moe_cache_acquire(c, model, 0, twice, 2, refs, &err), -EINVAL);
        ASSERT_CONTAINS(err.msg, "twice");
        ASSERT_EQ(moe_cache_acquire(c, model + 1, 0, twice, 1, refs, &err), -ENOENT);
        ASSERT_EQ(moe_cache_pin(c, model, 0, 9, &err), -EINVAL);
        moe_cache_free(c);
    }
}

/* Layer 0's expert e is always followed by layer 1's expert (e + 3) % 8:
 * once learned, prefetch has layer 1's expert there before it is asked.
 * With a prefetch mask (masked), only the even experts are prefetched: the
 * odd ones are still paged in when asked for, never ahead. */
static void run_prefetch(bool masked)
{
    int model;
    struct moe_cache *c = sim_cache(MOE_POLICY_ROUTING, true, 24, 4, 8, 1, &model);
    struct moe_cache_stats s;
    uint64_t seed = 8;

    if (masked) {
        uint8_t mask[4 * 8];
        struct moe_error err;

        for (int i = 0; i < 4 * 8; i++)
            mask[i] = i % 2 == 0;
        ASSERT_EQ(moe_cache_set_prefetch_mask(c, model, mask, &err), 0);
        ASSERT_EQ(moe_cache_set_prefetch_mask(c, 99, mask, &err), -ENOENT);
    }
    for (int t = 0; t < 400; t++) {
        int32_t e = (int32_t)(test_rand_u64(&seed) % 8);

        for (int layer = 0; layer < 4; layer++) {
            struct moe_cache_ref ref;

            ASSERT_EQ(moe_cache_acquire(c, model, layer, &e, 1, &ref, NULL), 0);
            ASSERT_EQ(ref.status, 0);
            moe_cache_observe(c, model, layer, &e, 1, 1);
            moe_cache_release(c, &ref, 1);
            e = (e + 3) % 8;
        }
    }
    ASSERT_EQ(moe_cache_snapshot(c, &s), 0);
    printf("prefetch: hits %llu misses %llu prefetch hits %llu prefetches %llu wasted %llu\n",
           (unsigned long long)s.total.hits, (unsigned long long)s.total.misses,
           (unsigned long long)s.total.prefetch_hits, (unsigned long long)s.total.prefetches,
           (unsigned long long)s.total.wasted_prefetches);
    /* Layers 1-3 (3 of every 4 accesses) are predictable. */
    ASSERT_TRUE(s.total.prefetch_hits > 0);
    ASSERT_TRUE(s.total.prefetch_hits <= s.total.prefetches);
    if (!masked) {
        ASSERT_TRUE(moe_cache_hit_rate(&s.total) > 0.74);
    } else {
        uint64_t even = 0;

        for (int i = 0; i < 4 * 8; i++) {
            uint64_t p = s.models[0].experts[i].c.prefetches;

            if (i % 2)
                ASSERT_EQ(p, 0); /* masked out: never prefetched */
            else
                even += p;
        }
        ASSERT_TRUE(even > 0);
        ASSERT_TRUE(s.total.misses > 0);
    }
    moe_cache_stats_clear(&s);
    moe_cache_free(c);
}

static void check_prefetch(void)
{
    run_prefetch(false);
    run_prefetch(true);
}

/*
 * The throttle's rule, moe_cache_prefetch_worth(p, cal, want, late, miss):
 * q = p * cal must reach want and q * (1 - late) > (1 - q) * late * miss.
 */
static void check_prefetch_worth(void)
{
    static const struct {
        double p, cal, want, late, miss;
        bool worth;
    } cases[] = {
        /* a read done before the next step: only the precision matters */
        {0.6, 1.0, 0.5, 0.0, 1.0, true},
        {0.5, 1.0, 0.5, 0.0, 1.0, true},    /* want reached exactly */
        {0.45, 1.0, 0.5, 0.0, 1.0, false},  /* below want */
        {0.8, 0.5, 0.5, 0.0, 1.0, false},   /* calibrated down: 0.4 used */
        {0.4, 1.5, 0.5, 0.0, 1.0, true},    /* calibrated up: 0.6 */
        {0.05, 20.0, 0.5, 0.0, 1.0, false}, /* under the predictor's floor */
        /* every step misses: worth it when q > late */
        {0.7, 1.0, 0.5, 0.6, 1.0, true},
        {0.6, 1.0, 0.5, 0.6, 1.0, false}, /* q == late: a wash, not taken */
        {0.5, 1.0, 0.5, 0.6, 1.0, false},
        {0.99, 1.0, 0.5, 1.0, 1.0, false}, /* not even started by the next step */
        {0.99, 1.0, 0.5, 1.0, 0.0, false}, /* ... saves nothing, whatever it costs */
        /* few steps miss: a wasted read rarely delays anyone */
        {0.5, 1.0, 0.5, 0.9, 0.1, true},  /* 0.5 * 0.1 > 0.5 * 0.9 * 0.1 */
        {0.5, 1.0, 0.5, 0.9, 0.2, false}, /* 0.05 < 0.09 */
        {0.5, 1.0, 0.5, 0.6, 0.0, true},  /* no demand reads to delay */
        /* unthrottled precision (want 0): any forecast over the floor */
        {0.1, 1.0, 0.0, 0.0, 1.0, true},
    };

    for (size_t i = 0; i < MOE_ARRAY_SIZE(cases); i++) {
        bool w = moe_cache_prefetch_worth(cases[i].p, cases[i].cal, cases[i].want, cases[i].late,
                                          cases[i].miss);

        if (w != cases[i].worth)
            FAIL("case %zu: p %g cal %g want %g late %g miss %g: worth %d, expected %d", i,
                 cases[i].p, cases[i].cal, cases[i].want, cases[i].late, cases[i].miss, w,
                 cases[i].worth);
    }
}

/* The daemon's estimate of the share of a read after the next step starts:
 * reads of 1000 bytes at 1 ms a byte (1 s each). */
static void check_read_late(void)
{
    static const struct {
        uint64_t backlog, bytes;
        double spb, step, late;
    } cases[] = {
        {0, 1000, 1e-3, 2.0, 0.0},    /* done a second before the step */
        {0, 1000, 1e-3, 1.0, 0.0},    /* done as it starts */
        {0, 1000, 1e-3, 0.25, 0.75},  /* three quarters after */
        {1000, 1000, 1e-3, 1.5, 0.5}, /* behind one read: [1, 2] against 1.5 */
        {3000, 1000, 1e-3, 1.5, 1.0}, /* not started by then */
        {0, 1000, 0.0, 0.25, 0.0},    /* throughput not measured yet */
        {0, 1000, 1e-3, 0.0, 0.0},    /* time between steps not measured yet */
        {0, 0, 1e-3, 0.25, 0.0},
    };

    for (size_t i = 0; i < MOE_ARRAY_SIZE(cases); i++)
        ASSERT_NEAR(
            moe_cache_read_late(cases[i].backlog, cases[i].bytes, cases[i].spb, cases[i].step),
            cases[i].late, 1e-12);
}

/*
 * Calibration: layer 0's expert e is followed by layer 1's (e + 3) % 16 for
 * 600 tokens, then by (e + 5) % 16 for 600 more.  The table keeps forecasting
 * e + 3 for a while after the switch; every such prefetch is wasted.  Unthrottled,
 * they go on; throttled, the layer's measured precision falls and prefetch of
 * the stale forecasts stops, while the first phase's prefetches (all used)
 * are untouched.  Returns the prefetches wasted in the second phase, and in
 * *ret_used the prefetch hits of the first.
 */
static uint64_t run_calibration(double precision, uint64_t *ret_used)
{
    struct moe_cache_config cfg = {
        .host_bytes = 8 * 4096,
        .policy = MOE_POLICY_LRU,
        .prefetch = true,
        .prefetch_max = 1,
        .prefetch_precision = precision,
        .simulate = true,
    };
    struct moe_cache *c;
    struct moe_cache_stats s;
    struct moe_error err;
    uint64_t seed = 5, wasted0 = 0;
    int model;

    if (moe_cache_create(&cfg, &c, &err) < 0)
        FAIL("cache: %s", err.msg);
    if (moe_cache_add_shape(c, "sim", 2, 16, 1, 4096, &model, &err) < 0)
        FAIL("shape: %s", err.msg);
    for (int t = 0; t < 1200; t++) {
        int32_t e[2];

        e[0] = (int32_t)(test_rand_u64(&seed) % 16);
        e[1] = (e[0] + (t < 600 ? 3 : 5)) % 16;
        if (t == 600) {
            ASSERT_EQ(moe_cache_snapshot(c, &s), 0);
            *ret_used = s.total.prefetch_hits;
            wasted0 = s.total.wasted_prefetches;
            moe_cache_stats_clear(&s);
        }
        for (int layer = 0; layer < 2; layer++) {
            struct moe_cache_ref ref;

            ASSERT_EQ(moe_cache_acquire(c, model, layer, &e[layer], 1, &ref, NULL), 0);
            moe_cache_observe(c, model, layer, &e[layer], 1, 1);
            moe_cache_release(c, &ref, 1);
        }
    }
    ASSERT_EQ(moe_cache_snapshot(c, &s), 0);
    /* Bytes: every prefetch and every wasted one is one 4096-byte expert,
     * per tier as in total; precision as the counts give it. */
    ASSERT_EQ(s.total.prefetched_bytes, s.total.prefetches * 4096);
    ASSERT_EQ(s.total.wasted_bytes, s.total.wasted_prefetches * 4096);
    ASSERT_EQ(s.tiers[0].c.wasted_bytes, s.total.wasted_bytes);
    if (s.total.prefetch_hits + s.total.wasted_prefetches)
        ASSERT_NEAR(moe_cache_prefetch_precision(&s.total),
                    (double)s.total.prefetch_hits /
                        (double)(s.total.prefetch_hits + s.total.wasted_prefetches),
                    1e-12);
    wasted0 = s.total.wasted_prefetches - wasted0;
    printf("calibration (precision %g): prefetch hits %llu of phase 1, wasted %llu in phase 2\n",
           precision, (unsigned long long)*ret_used, (unsigned long long)wasted0);
    moe_cache_stats_clear(&s);
    moe_cache_free(c);
    return wasted0;
}

static void check_calibration(void)
{
    uint64_t used_free, used_thr;
    uint64_t wasted_free = run_calibration(-1, &used_free);
    uint64_t wasted_thr = run_calibration(0, &used_thr);

    /* Phase 1: the rule is right (a prefetch whenever layer 1's expert is
     * not resident already), the throttle holds nothing back. */
    ASSERT_TRUE(used_free > 350);
    ASSERT_TRUE(used_thr >= used_free * 95 / 100);
    /* Phase 2: unthrottled, the stale forecasts keep wasting reads until
     * the table learns the new rule; the calibration stops them sooner. */
    ASSERT_TRUE(wasted_free > 150);
    ASSERT_TRUE(wasted_thr < wasted_free / 2);
}

/* Layer-to-layer routing with nothing to learn from the table (random), but
 * a lookahead that names the next layer's expert 3 times in 4: the
 * predictor measures that precision, and prefetch turns it into hits. */
static void check_lookahead(void)
{
    int model;
    struct moe_cache *c = sim_cache(MOE_POLICY_ROUTING, true, 16, 4, 16, 1, &model);
    struct moe_cache_stats s;
    uint64_t seed = 21;
    int32_t e = 0, next = 0;

    for (int t = 0; t < 2000; t++) {
        for (int layer = 0; layer < 4; layer++) {
            struct moe_cache_ref ref;
            int32_t la = (int32_t)(test_rand_u64(&seed) % 16);

            e = layer ? next : (int32_t)(test_rand_u64(&seed) % 16);
            next = (int32_t)(test_rand_u64(&seed) % 16);
            if (test_rand_u64(&seed) % 4 != 0)
                la = next;
            ASSERT_EQ(moe_cache_acquire(c, model, layer, &e, 1, &ref, NULL), 0);
            moe_cache_observe_ahead(c, model, layer, &e, layer < 3 ? &la : NULL, 1, 1);
            moe_cache_release(c, &ref, 1);
        }
    }
    ASSERT_EQ(moe_cache_snapshot(c, &s), 0);
    printf("lookahead: hit rate %.3f, prefetch hits %llu of %llu\n", moe_cache_hit_rate(&s.total),
           (unsigned long long)s.total.prefetch_hits, (unsigned long long)s.total.prefetches);
    /* Layers 1-3 come 3 times in 4 from the lookahead: > 0.75 * 0.75. */
    ASSERT_TRUE(moe_cache_hit_rate(&s.total) > 0.55);
    ASSERT_TRUE(s.total.prefetch_hits > s.total.prefetches / 2);
    moe_cache_stats_clear(&s);
    moe_cache_free(c);
}

static void check_shrink(void)
{
    int model;
    struct moe_cache *c = sim_cache(MOE_POLICY_FREQ, false, 10, 1, 16, 2, &model);
    struct moe_cache_stats s;
    struct moe_error err;

    for (int32_t x = 0; x < 16; x++) {
        struct moe_cache_ref ref;

        ASSERT_EQ(moe_cache_acquire(c, model, 0, &x, 1, &ref, NULL), 0);
        moe_cache_release(c, &ref, 1);
    }
    /* Switching policy keeps what is resident and goes on working. */
    ASSERT_EQ(moe_cache_set_policy(c, MOE_POLICY_LRU, true, &err), 0);
    ASSERT_EQ(moe_cache_snapshot(c, &s), 0);
    ASSERT_EQ(s.tiers[0].resident, 10u);
    ASSERT_STREQ(s.policy, "lru");
    moe_cache_stats_clear(&s);
    for (int32_t x = 0; x < 16; x++) {
        struct moe_cache_ref ref;

        ASSERT_EQ(moe_cache_acquire(c, model, 0, &x, 1, &ref, NULL), 0);
        ASSERT_EQ(ref.status, 0);
        moe_cache_release(c, &ref, 1);
    }
    ASSERT_EQ(moe_cache_set_policy(c, MOE_POLICY_ROUTING, false, &err), 0);
    ASSERT_EQ(moe_cache_set_capacity(c, 0, 4 * 4096, &err), 0);
    ASSERT_EQ(moe_cache_snapshot(c, &s), 0);
    ASSERT_EQ(s.tiers[0].resident, 4u);
    ASSERT_EQ(s.tiers[0].capacity, 4u * 4096);
    moe_cache_stats_clear(&s);
    ASSERT_EQ(moe_cache_set_capacity(c, 0, 12 * 4096, &err), 0);
    ASSERT_EQ(moe_cache_set_capacity(c, 3, 4096, &err), -EINVAL);
    moe_cache_free(c);
}

/*
 * The adaptive policy's shadows hold nodes of every model: removing a model
 * takes its nodes out of them, and switching policies empties them; the
 * cache goes on hitting as lru would on a loop that fits.
 */
static void check_adaptive_models(void)
{
    struct moe_cache_config cfg = {
        .host_bytes = 12 * 4096, .policy = MOE_POLICY_ADAPTIVE, .simulate = true};
    struct moe_cache *c;
    struct moe_cache_stats s;
    struct moe_error err;
    int a, b;
    uint64_t seed = 4;

    if (moe_cache_create(&cfg, &c, &err) < 0)
        FAIL("cache: %s", err.msg);
    ASSERT_EQ(moe_cache_add_shape(c, "a", 2, 16, 1, 4096, &a, &err), 0);
    ASSERT_EQ(moe_cache_add_shape(c, "b", 2, 16, 1, 4096, &b, &err), 0);
    for (int round = 0; round < 3; round++) {
        for (int t = 0; t < 500; t++) {
            for (int m = 0; m < 2; m++) {
                int model = m ? b : a;
                int32_t e = (int32_t)(test_rand_u64(&seed) % 16);
                struct moe_cache_ref ref;

                if (round > 0 && model == b)
                    continue; /* removed */
                for (int layer = 0; layer < 2; layer++) {
                    ASSERT_EQ(moe_cache_acquire(c, model, layer, &e, 1, &ref, NULL), 0);
                    ASSERT_EQ(ref.status, 0);
                    moe_cache_release(c, &ref, 1);
                }
            }
        }
        if (round == 0)
            ASSERT_EQ(moe_cache_remove_model(c, b, &err), 0);
        if (round == 1) {
            ASSERT_EQ(moe_cache_set_policy(c, MOE_POLICY_LRU, false, &err), 0);
            ASSERT_EQ(moe_cache_set_policy(c, MOE_POLICY_ADAPTIVE, false, &err), 0);
        }
    }
    /* Model a alone: 4 experts in a loop of 12 slots, after warming. */
    ASSERT_EQ(moe_cache_snapshot(c, &s), 0);
    ASSERT_STREQ(s.policy, "adaptive");
    moe_cache_stats_clear(&s);
    for (int i = 0; i < 40; i++) {
        int32_t e = i % 4;
        struct moe_cache_ref ref;

        ASSERT_EQ(moe_cache_acquire(c, a, 0, &e, 1, &ref, NULL), 0);
        ASSERT_TRUE(i < 4 || ref.hit);
        moe_cache_release(c, &ref, 1);
    }
    moe_cache_free(c);
}

/* ---- real page-ins -------------------------------------------------------------------------- */

static char *make_model(const char *tag)
{
    struct moe_genmodel_opts o;
    struct moe_error err = {0};
    char *dir = test_tmpdir(tag);

    moe_genmodel_defaults(MOE_ARCH_MIXTRAL, &o);
    o.out_dir = dir;
    o.hidden = 256;
    o.ffn = 160;
    o.n_layers = 3;
    o.n_experts = 8;
    o.seed = 11;
    o.n_shards = 2;
    if (moe_genmodel_write(&o, &err) != 0)
        FAIL("gen-model: %s", err.msg);
    return dir;
}

/* The weights a ref points to equal the tensors in the file. */
static void check_weights(const struct moe_model *m, int layer, const struct moe_cache_ref *ref)
{
    const struct moe_expert_ref *x = &m->layers[layer].experts[ref->expert];
    const struct moe_tensor_ref *t[3] = {&x->gate, &x->up, &x->down};
    const void *p[3] = {ref->w.gate, ref->w.up, ref->w.down};

    ASSERT_EQ(ref->w.hidden, m->cfg.hidden);
    ASSERT_EQ(ref->w.ffn, m->cfg.expert_ffn);
    for (int i = 0; i < 3; i++) {
        void *buf = malloc(t[i]->nbytes);

        ASSERT_EQ(moe_model_read(m, t[i], buf, NULL), 0);
        ASSERT_TRUE(memcmp(buf, p[i], t[i]->nbytes) == 0);
        free(buf);
    }
}

struct racer {
    struct moe_cache *c;
    const struct moe_model *m;
    int model;
    int ok;
};

static void *race(void *arg)
{
    struct racer *r = arg;
    int32_t ex[4] = {1, 3, 5, 7};
    struct moe_cache_ref refs[4];

    if (moe_cache_acquire(r->c, r->model, 2, ex, 4, refs, NULL) == 0) {
        r->ok = 1;
        for (int i = 0; i < 4; i++)
            if (moe_cache_wait(r->c, &refs[i], NULL) != 0)
                r->ok = 0;
        if (r->ok)
            for (int i = 0; i < 4; i++)
                check_weights(r->m, 2, &refs[i]);
        moe_cache_release(r->c, refs, 4);
    }
    return NULL;
}

static struct moe_cache *real_cache(const struct moe_model *m, uint64_t bytes, int *model)
{
    struct moe_cache_config cfg = {.host_bytes = bytes, .policy = MOE_POLICY_LRU};
    struct moe_cache *c;
    struct moe_error err;

    cfg.pager.chunk_bytes = 8192; /* several reads per expert */
    if (moe_cache_create(&cfg, &c, &err) < 0)
        FAIL("cache: %s", err.msg);
    if (moe_cache_add_model(c, m, "mixtral", model, &err) < 0)
        FAIL("add model: %s", err.msg);
    return c;
}

static void check_real(void)
{
    char *dir = make_model("cache-real");
    struct moe_model *m;
    struct moe_error err;
    struct moe_cache *c;
    struct moe_cache_stats s;
    int model;

    ASSERT_EQ(moe_model_open(dir, &m, &err), 0);
    c = real_cache(m, 64ull << 20, &model);
    /* A model whose file went away is refused; the cache carries on. */
    {
        char *dir2 = make_model("cache-gone");
        struct moe_model *m2;
        int id2 = -1;

        ASSERT_EQ(moe_model_open(dir2, &m2, &err), 0);
        ASSERT_EQ(unlink(m2->files[1].path), 0);
        ASSERT_EQ(moe_cache_add_model(c, m2, "gone", &id2, &err), -ENOENT);
        ASSERT_CONTAINS(err.msg, "model-00002-of-00002.safetensors");
        ASSERT_EQ(id2, -1);
        moe_model_free(m2);
        test_rmtree(dir2);
        free(dir2);
    }

    /* Every expert of every layer, bytes checked. */
    for (int layer = 0; layer < m->cfg.n_layers; layer++) {
        int32_t ex[8] = {0, 1, 2, 3, 4, 5, 6, 7};
        struct moe_cache_ref refs[8];

        if (layer == 2)
            break; /* layer 2 is for the race below */
        ASSERT_EQ(moe_cache_acquire(c, model, layer, ex, 8, refs, &err), 0);
        for (int i = 0; i < 8; i++) {
            ASSERT_EQ(moe_cache_wait(c, &refs[i], &err), 0);
            check_weights(m, layer, &refs[i]);
        }
        moe_cache_release(c, refs, 8);
    }
    /* Single flight: 4 threads ask for the same cold experts at once. */
    {
        pthread_t th[4];
        struct racer rc[4];

        for (int i = 0; i < 4; i++) {
            rc[i] = (struct racer){c, m, model, 0};
            pthread_create(&th[i], NULL, race, &rc[i]);
        }
        for (int i = 0; i < 4; i++) {
            pthread_join(th[i], NULL);
            ASSERT_EQ(rc[i].ok, 1);
        }
    }
    ASSERT_EQ(moe_cache_snapshot(c, &s), 0);
    ASSERT_EQ(s.total.page_ins, 16u + 4u); /* each expert read once */
    ASSERT_EQ(s.tiers[0].latency.count, 20u);
    ASSERT_TRUE(s.tiers[0].latency.p50_ns <= s.tiers[0].latency.p99_ns);
    ASSERT_TRUE(s.tiers[0].latency.p99_ns <= s.tiers[0].latency.max_ns);
    ASSERT_TRUE(s.total.bytes_paged >= 20 * m->expert_bytes);
    ASSERT_EQ(s.total.hits + s.total.misses, 16u + 16u);
    moe_cache_stats_clear(&s);
    moe_cache_free(c);

    /* Faults: the first read fails; the expert is bad until retried. */
    {
        struct moe_pager_faults f = {.fail_nth = 1};
        struct moe_pager_stats ps;
        struct moe_cache_ref ref, ref2;
        int32_t ex = 4, other = 5;
        uint64_t reads;

        c = real_cache(m, 64ull << 20, &model);
        moe_pager_set_faults(moe_cache_pager(c), &f);
        ASSERT_EQ(moe_cache_acquire(c, model, 0, &ex, 1, &ref, &err), 0);
        ASSERT_EQ(moe_cache_wait(c, &ref, &err), -EIO);
        ASSERT_CONTAINS(err.msg, "layer 0 expert 4");
        moe_cache_release(c, &ref, 1);
        ASSERT_EQ(moe_cache_snapshot(c, &s), 0);
        ASSERT_TRUE(s.models[0].experts[4].bad);
        ASSERT_EQ(s.models[0].bad_experts, 1);
        ASSERT_EQ(s.total.page_in_errors, 1u);
        ASSERT_EQ(s.tiers[0].used, 0u); /* nothing leaked */
        moe_cache_stats_clear(&s);
        /* Others are served; the bad one fails at once, without I/O. */
        ASSERT_EQ(moe_cache_acquire(c, model, 0, &other, 1, &ref2, &err), 0);
        ASSERT_EQ(moe_cache_wait(c, &ref2, &err), 0);
        check_weights(m, 0, &ref2);
        moe_cache_release(c, &ref2, 1);
        moe_pager_get_stats(moe_cache_pager(c), &ps);
        reads = ps.reads;
        ASSERT_EQ(moe_cache_acquire(c, model, 0, &ex, 1, &ref, &err), 0);
        ASSERT_EQ(moe_cache_wait(c, &ref, &err), -EIO);
        moe_cache_release(c, &ref, 1);
        moe_pager_get_stats(moe_cache_pager(c), &ps);
        ASSERT_EQ(ps.reads, reads);
        ASSERT_EQ(moe_cache_pin(c, model, 0, 4, &err), -EIO);
        ASSERT_CONTAINS(err.msg, "retry");
        /* Retry clears the mark; short reads still give the right bytes. */
        f = (struct moe_pager_faults){.short_nth = 2, .every = true};
        moe_pager_set_faults(moe_cache_pager(c), &f);
        ASSERT_EQ(moe_cache_retry(c, model, -1, -1, &err), 1);
        ASSERT_EQ(moe_cache_acquire(c, model, 0, &ex, 1, &ref, &err), 0);
        ASSERT_EQ(moe_cache_wait(c, &ref, &err), 0);
        check_weights(m, 0, &ref);
        moe_cache_release(c, &ref, 1);
        moe_pager_get_stats(moe_cache_pager(c), &ps);
        ASSERT_TRUE(ps.short_reads > 0);
        moe_cache_free(c);
    }

    /* A checkpoint (no checksum in an index): a byte flipped in the first
     * read of an expert is not taken as its checksum.  The two reads of
     * its first page-in disagree (-EIO); retried, it arrives whole, and a
     * byte flipped in a later page-in is read again and served whole. */
    {
        struct moe_pager_faults f = {.corrupt_nth = 1};
        struct moe_pager_stats ps;
        struct moe_cache_ref ref;
        int32_t ex = 6;
        uint64_t reads, twice;

        c = real_cache(m, 64ull << 20, &model);
        moe_pager_set_faults(moe_cache_pager(c), &f);
        ASSERT_EQ(moe_cache_acquire(c, model, 1, &ex, 1, &ref, &err), 0);
        ASSERT_EQ(moe_cache_wait(c, &ref, &err), -EIO);
        ASSERT_CONTAINS(err.msg, "layer 1 expert 6");
        ASSERT_CONTAINS(err.msg, "two reads");
        ASSERT_CONTAINS(err.msg, ".safetensors");
        moe_cache_release(c, &ref, 1);
        f.corrupt_nth = 0;
        moe_pager_set_faults(moe_cache_pager(c), &f);
        ASSERT_EQ(moe_cache_retry(c, model, 1, 6, &err), 1);
        moe_pager_get_stats(moe_cache_pager(c), &ps);
        reads = ps.reads;
        ASSERT_EQ(moe_cache_acquire(c, model, 1, &ex, 1, &ref, &err), 0);
        ASSERT_EQ(moe_cache_wait(c, &ref, &err), 0);
        check_weights(m, 1, &ref);
        moe_cache_release(c, &ref, 1);
        /* its first page-in: read twice */
        moe_pager_get_stats(moe_cache_pager(c), &ps);
        twice = ps.reads - reads;
        ASSERT_TRUE(twice >= 2);
        ASSERT_EQ(twice % 2, 0u);
        reads = ps.reads;
        /* A later page-in, checked against that checksum: read once. */
        ASSERT_EQ(moe_cache_evict(c, model, 1, 6, &err), 0);
        ASSERT_EQ(moe_cache_acquire(c, model, 1, &ex, 1, &ref, &err), 0);
        ASSERT_EQ(moe_cache_wait(c, &ref, &err), 0);
        check_weights(m, 1, &ref);
        moe_cache_release(c, &ref, 1);
        moe_pager_get_stats(moe_cache_pager(c), &ps);
        ASSERT_EQ((ps.reads - reads) * 2, twice);
        /* A flipped byte there: read again, served whole. */
        ASSERT_EQ(moe_cache_evict(c, model, 1, 6, &err), 0);
        f.corrupt_nth = 1;
        moe_pager_set_faults(moe_cache_pager(c), &f);
        ASSERT_EQ(moe_cache_acquire(c, model, 1, &ex, 1, &ref, &err), 0);
        ASSERT_EQ(moe_cache_wait(c, &ref, &err), 0);
        check_weights(m, 1, &ref);
        moe_cache_release(c, &ref, 1);
        moe_cache_free(c);
    }

    /* A packed store: a byte flipped in a read fails the checksum. */
    {
        char *pdir = test_tmpdir("cache-pack");
        struct moe_model *pm;
        struct moe_pager_faults f = {.corrupt_nth = 1};
        struct moe_cache_ref ref;
        int32_t ex = 3;

        ASSERT_EQ(moe_pack_write(m, pdir, true, NULL, NULL, &err), 0);
        ASSERT_EQ(moe_model_open(pdir, &pm, &err), 0);
        ASSERT_TRUE(pm->packed && pm->layers[1].experts[3].has_xxh3);
        c = real_cache(pm, 64ull << 20, &model);
        moe_pager_set_faults(moe_cache_pager(c), &f);
        ASSERT_EQ(moe_cache_acquire(c, model, 1, &ex, 1, &ref, &err), 0);
        ASSERT_EQ(moe_cache_wait(c, &ref, &err), -EBADMSG);
        ASSERT_CONTAINS(err.msg, "layer 1 expert 3");
        ASSERT_CONTAINS(err.msg, "checksum mismatch in experts.bin");
        moe_cache_release(c, &ref, 1);
        /* retried without the fault, the same expert arrives whole */
        f.corrupt_nth = 0;
        moe_pager_set_faults(moe_cache_pager(c), &f);
        ASSERT_EQ(moe_cache_retry(c, model, 1, 3, &err), 1);
        ASSERT_EQ(moe_cache_acquire(c, model, 1, &ex, 1, &ref, &err), 0);
        ASSERT_EQ(moe_cache_wait(c, &ref, &err), 0);
        check_weights(pm, 1, &ref);
        moe_cache_release(c, &ref, 1);
        moe_cache_free(c);
        moe_model_free(pm);
        test_rmtree(pdir);
        free(pdir);
    }
    /* A file truncated under the open model. */
    {
        const struct moe_tensor_ref *t = &m->layers[2].experts[7].down;
        struct moe_cache_ref ref;
        int32_t ex = 7;

        c = real_cache(m, 64ull << 20, &model);
        ASSERT_EQ(truncate(m->files[t->file].path, (off_t)t->offset), 0);
        ASSERT_EQ(moe_cache_acquire(c, model, 2, &ex, 1, &ref, &err), 0);
        ASSERT_EQ(moe_cache_wait(c, &ref, &err), -EIO);
        ASSERT_CONTAINS(err.msg, "truncated");
        ASSERT_CONTAINS(err.msg, "layer 2 expert 7");
        moe_cache_release(c, &ref, 1);
        moe_cache_free(c);
    }
    moe_model_free(m);
    test_rmtree(dir);
    free(dir);
}

/* Uses every expert of layer, one at a time, checking the bytes. */
static void use_each(struct moe_cache *c, int model, const struct moe_model *m, int layer)
{
    struct moe_error err;

    for (int32_t x = 0; x < m->cfg.n_experts; x++) {
        struct moe_cache_ref ref;

        ASSERT_EQ(moe_cache_acquire(c, model, layer, &x, 1, &ref, &err), 0);
        ASSERT_EQ(moe_cache_wait(c, &ref, &err), 0);
        check_weights(m, layer, &ref);
        moe_cache_release(c, &ref, 1);
    }
}

/* A second host tier in front: the last tier is read into, the front one
 * filled from it; an expert evicted from the front comes back without I/O. */
static void check_two_tiers(void)
{
    char *dir = make_model("cache-tiers");
    struct moe_model *m;
    struct moe_error err;
    struct moe_cache *c;
    struct moe_tier *front;
    struct moe_cache_stats s;
    struct moe_pager_stats ps;
    uint64_t reads;
    int model;
    struct moe_cache_config cfg = {.host_bytes = 64ull << 20, .policy = MOE_POLICY_LRU};

    ASSERT_EQ(moe_model_open(dir, &m, &err), 0);
    ASSERT_EQ(moe_cache_create(&cfg, &c, &err), 0);
    /* room for two experts in front */
    ASSERT_EQ(moe_tier_host_create("front", 2 * (m->expert_bytes + 3 * 8192), false, &front, &err),
              0);
    ASSERT_EQ(moe_cache_push_tier(c, front, &err), 0);
    ASSERT_EQ(moe_cache_add_model(c, m, "mixtral", &model, &err), 0);
    use_each(c, model, m, 1);
    moe_pager_get_stats(moe_cache_pager(c), &ps);
    reads = ps.jobs_done;
    ASSERT_EQ(reads, 2 * 8u); /* a first page-in is read twice (no checksum in a checkpoint) */
    use_each(c, model, m, 1);
    moe_pager_get_stats(moe_cache_pager(c), &ps);
    ASSERT_EQ(ps.jobs_done, reads);
    ASSERT_EQ(moe_cache_snapshot(c, &s), 0);
    ASSERT_EQ(s.n_tiers, 2);
    ASSERT_STREQ(s.tiers[0].name, "front");
    ASSERT_STREQ(s.tiers[1].name, "host");
    ASSERT_EQ(s.tiers[0].resident, 2u);
    ASSERT_EQ(s.tiers[1].resident, 8u);
    ASSERT_EQ(s.tiers[1].c.hits, 8u); /* every front miss of the second round */
    moe_cache_stats_clear(&s);
    moe_cache_free(c);
    moe_model_free(m);
    test_rmtree(dir);
    free(dir);
}

/*
 * Two tiers: a batch's expert that is only in the tier behind (host) stays
 * there while another expert of the batch is read into that tier, so it is
 * uploaded, not read again.  Front: room for 2 experts; host: for 3.
 */
static void check_two_tiers_held(void)
{
    char *dir = make_model("cache-tiers-held");
    struct moe_model *m;
    struct moe_error err;
    struct moe_cache *c;
    struct moe_tier *front;
    struct moe_pager_stats ps;
    struct moe_cache_ref refs[2];
    struct moe_cache_stats s;
    int32_t batch[2] = {3, 0};
    int model;
    struct moe_cache_config cfg = {.policy = MOE_POLICY_LRU};

    ASSERT_EQ(moe_model_open(dir, &m, &err), 0);
    cfg.host_bytes = 3 * (m->expert_bytes + 3 * 8192);
    ASSERT_EQ(moe_cache_create(&cfg, &c, &err), 0);
    ASSERT_EQ(moe_tier_host_create("front", 2 * (m->expert_bytes + 3 * 8192), false, &front, &err),
              0);
    ASSERT_EQ(moe_cache_push_tier(c, front, &err), 0);
    ASSERT_EQ(moe_cache_add_model(c, m, "mixtral", &model, &err), 0);
    /* 0, 1, 2 one at a time: host holds 0 (least recently used), 1, 2; the
     * front 1, 2. */
    for (int32_t x = 0; x < 3; x++) {
        ASSERT_EQ(moe_cache_acquire(c, model, 1, &x, 1, refs, &err), 0);
        ASSERT_EQ(moe_cache_wait(c, &refs[0], &err), 0);
        moe_cache_release(c, refs, 1);
    }
    moe_pager_get_stats(moe_cache_pager(c), &ps);
    ASSERT_EQ(ps.jobs_done, 2 * 3u); /* first page-ins: each read twice */
    /* Reading 3 into the host tier evicts 1 there, not 0: the batch needs 0. */
    ASSERT_EQ(moe_cache_acquire(c, model, 1, batch, 2, refs, &err), 0);
    for (int i = 0; i < 2; i++) {
        ASSERT_EQ(moe_cache_wait(c, &refs[i], &err), 0);
        check_weights(m, 1, &refs[i]);
    }
    moe_cache_release(c, refs, 2);
    moe_pager_get_stats(moe_cache_pager(c), &ps);
    ASSERT_EQ(ps.jobs_done, 2 * 4u);
    ASSERT_EQ(moe_cache_snapshot(c, &s), 0);
    ASSERT_EQ(s.tiers[1].c.hits, 1u); /* 0 came from the host tier */
    ASSERT_EQ(s.models[0].experts[1 * 8 + 1].tier, -1);
    moe_cache_stats_clear(&s);
    moe_cache_free(c);
    moe_model_free(m);
    test_rmtree(dir);
    free(dir);
}

/* Warm start: heat back as given (uses + half the heat warmed with), the
 * hottest that fit paged in, nothing evicted, first uses counted. */
static void check_warm(void)
{
    int model;
    struct moe_cache *c = sim_cache(MOE_POLICY_LRU, false, 6, 2, 8, 2, &model);
    struct moe_cache_stats s;
    struct moe_error err;
    double heat[16] = {0}, got[16];
    int32_t ids[2];
    struct moe_cache_ref refs[2];

    /* 9 experts with heat; 6 fit, share 1.0 */
    for (int i = 0; i < 9; i++)
        heat[i] = 10.0 + i; /* layer 0 experts 0..7, layer 1 expert 0 */
    heat[15] = 100.0;       /* layer 1 expert 7: the hottest */
    ASSERT_EQ(moe_cache_warm(c, model, heat, 1.5, &err), -EINVAL);
    ASSERT_EQ(moe_cache_warm(c, model, heat, 1.0, &err), 6);
    ASSERT_TRUE(moe_cache_resident(c, model, 1, 7));
    ASSERT_TRUE(moe_cache_resident(c, model, 1, 0));
    ASSERT_TRUE(moe_cache_resident(c, model, 0, 7));
    ASSERT_TRUE(moe_cache_resident(c, model, 0, 4));
    ASSERT_TRUE(!moe_cache_resident(c, model, 0, 3)); /* the 7th hottest */
    /* a second warm start has no room left: it evicts nothing */
    ASSERT_EQ(moe_cache_warm(c, model, heat, 1.0, &err), 0);
    ids[0] = 7;
    ids[1] = 3;
    ASSERT_EQ(moe_cache_acquire(c, model, 0, ids, 2, refs, &err), 0);
    moe_cache_release(c, refs, 2);
    ASSERT_EQ(moe_cache_snapshot(c, &s), 0);
    ASSERT_EQ(s.total.warm_loads, 6);
    ASSERT_EQ(s.total.warm_hits, 1); /* expert 7; 3 was a miss */
    ASSERT_EQ(s.total.misses, 1);
    moe_cache_stats_clear(&s);
    /* heat: uses + half the warm heat */
    ASSERT_EQ(moe_cache_heat(c, model, got, &err), 0);
    ASSERT_NEAR(got[7], 1 + 0.5 * 17.0, 1e-9);
    ASSERT_NEAR(got[3], 1 + 0.5 * 13.0, 1e-9);
    ASSERT_NEAR(got[15], 0.5 * 100.0, 1e-9);
    ASSERT_NEAR(got[14], 0.0, 0);
    ASSERT_EQ(moe_cache_heat(c, model + 7, got, &err), -ENOENT);
    moe_cache_free(c);

    /* share: at most half of the 6 slots */
    c = sim_cache(MOE_POLICY_LRU, false, 6, 2, 8, 2, &model);
    ASSERT_EQ(moe_cache_warm(c, model, heat, 0.5, &err), 3);
    moe_cache_free(c);
}

int main(void)
{
    check_arena();
    check_lru_reference();
    check_batch_held();
    check_batch_too_large();
    check_pins();
    check_prefetch();
    check_prefetch_worth();
    check_read_late();
    check_calibration();
    check_lookahead();
    check_shrink();
    check_adaptive_models();
    check_real();
    check_two_tiers();
    check_two_tiers_held();
    check_warm();
    printf("ok\n");
    return 0;
}
