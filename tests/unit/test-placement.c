/*
 * The cluster's placement map (daemon/placement.c): each layer's experts
 * round-robin over the members from the layer's offset, so every member owns
 * within one of its share; a hot expert's replicas are the next members,
 * never the owner twice; a pick spreads over the holders that are up, skips
 * the excluded one, and falls back to this node; the hot set is at most the
 * fraction asked, only experts well above the mean load, the most loaded
 * first.
 */
#include "common.h"
#include "placement.h"
#include "tests.h"

#include <string.h>

static bool up_mask(const void *arg, int m)
{
    return (*(const unsigned *)arg >> m) & 1u;
}

static void check_holders(void)
{
    static const struct {
        int n, replicas;
    } cases[] = {{1, 0}, {1, 2}, {2, 1}, {3, 1}, {3, 2}, {3, 5}, {5, 2}, {8, 1}};

    for (size_t c = 0; c < MOE_ARRAY_SIZE(cases); c++) {
        const int n = cases[c].n, R = cases[c].replicas;

        for (int layer = 0; layer < 4; layer++) {
            int owned[8] = {0}, h[16];

            for (int e = 0; e < 64; e++) {
                ASSERT_EQ(moed_placement_holders(n, layer, e, false, R, h), 1);
                ASSERT_EQ(h[0], (e + layer) % n);
                owned[h[0]]++;
                int k = moed_placement_holders(n, layer, e, true, R, h);

                ASSERT_EQ(k, 1 + MOE_MIN(R, n - 1));
                ASSERT_EQ(h[0], (e + layer) % n);
                for (int i = 0; i < k; i++) {
                    ASSERT_TRUE(h[i] >= 0 && h[i] < n);
                    for (int j = 0; j < i; j++)
                        ASSERT_NE(h[i], h[j]);
                    ASSERT_EQ(h[i], (h[0] + i) % n);
                }
            }
            /* Balanced: 64 experts over n members, within one. */
            for (int m = 0; m < n; m++)
                ASSERT_TRUE(owned[m] == 64 / n || owned[m] == 64 / n + 1);
        }
    }
}

static void check_pick(void)
{
    static const int h[3] = {2, 0, 1};
    unsigned all = 0x7, none = 0x0, only1 = 0x2;
    int seen[3] = {0};

    /* Spread by salt over the holders that are up. */
    for (uint32_t salt = 0; salt < 30; salt++)
        seen[moed_placement_pick(h, 3, salt, -1, up_mask, &all, 9)]++;
    ASSERT_EQ(seen[0], 10);
    ASSERT_EQ(seen[1], 10);
    ASSERT_EQ(seen[2], 10);
    ASSERT_EQ(moed_placement_pick(h, 3, 0, -1, up_mask, &all, 9), 2);
    ASSERT_EQ(moed_placement_pick(h, 3, 1, -1, up_mask, &all, 9), 0);
    /* The excluded member (a failed one) and members down are skipped. */
    ASSERT_EQ(moed_placement_pick(h, 3, 0, 2, up_mask, &all, 9), 0);
    for (uint32_t salt = 0; salt < 6; salt++)
        ASSERT_EQ(moed_placement_pick(h, 3, salt, -1, up_mask, &only1, 9), 1);
    ASSERT_EQ(moed_placement_pick(h, 3, 0, 1, up_mask, &only1, 9), 9);
    /* Nobody up: this node (self) pages it in. */
    ASSERT_EQ(moed_placement_pick(h, 3, 5, -1, up_mask, &none, 7), 7);
}

static void check_hot(void)
{
    static const struct {
        uint32_t load[8];
        double fraction;
        uint8_t want[8];
    } cases[] = {
        /* nothing routed: nothing hot */
        {{0, 0, 0, 0, 0, 0, 0, 0}, 0.5, {0}},
        /* even load: nothing is above twice the mean */
        {{10, 10, 10, 10, 10, 10, 10, 10}, 0.5, {0}},
        /* one hot spot */
        {{1, 1, 100, 1, 1, 1, 1, 1}, 0.125, {0, 0, 1, 0, 0, 0, 0, 0}},
        /* two spots, a fraction for one: the larger */
        {{1, 90, 100, 1, 1, 1, 1, 1}, 0.125, {0, 0, 1, 0, 0, 0, 0, 0}},
        /* two spots, room for both */
        {{1, 90, 100, 1, 1, 1, 1, 1}, 0.25, {0, 1, 1, 0, 0, 0, 0, 0}},
        /* room for three, only two well above the mean */
        {{5, 90, 100, 5, 5, 5, 5, 5}, 0.375, {0, 1, 1, 0, 0, 0, 0, 0}},
        /* ties at the threshold: in index order, up to the fraction */
        {{50, 0, 50, 0, 50, 0, 0, 0}, 0.25, {1, 0, 1, 0, 0, 0, 0, 0}},
        /* fraction 0: none */
        {{1, 1, 100, 1, 1, 1, 1, 1}, 0.0, {0}},
    };

    for (size_t c = 0; c < MOE_ARRAY_SIZE(cases); c++) {
        uint8_t hot[8];
        size_t n = moed_placement_hot(cases[c].load, 8, cases[c].fraction, hot), k = 0;

        for (int i = 0; i < 8; i++) {
            if (hot[i] != cases[c].want[i])
                FAIL("case %zu, expert %d: hot %d, expected %d", c, i, hot[i], cases[c].want[i]);
            k += hot[i];
        }
        ASSERT_EQ(n, k);
    }
}

int main(void)
{
    check_holders();
    check_pick();
    check_hot();
    printf("ok\n");
    return 0;
}
