/*
 * The memory budget and its buffer pool (engine/membudget.c): charges fit,
 * wait or never fit; the pool hands back a buffer of the right size only,
 * holds at most pool_bytes, and trim empties it.
 */
#include "membudget.h"
#include "tests.h"

#include <errno.h>

int main(void)
{
    struct moe_membudget_config cfg = {.limit = 1000, .pool_bytes = 4096, .trim_bytes = 1500};
    struct moe_membudget *b;
    struct moe_membudget_stats st;
    struct moe_error err = {0};
    size_t cap, cap2;
    void *p, *q, *r;

    ASSERT_EQ(moe_membudget_create(&cfg, &b, &err), 0);

    /* Charges: fit, wait for a release, never fit. */
    static const struct {
        uint64_t bytes;
        int want;
    } steps[] = {{600, 0}, {400, 0}, {1, -EAGAIN}, {1001, -ENOSPC}, {1000, -EAGAIN}};
    for (size_t i = 0; i < sizeof(steps) / sizeof(steps[0]); i++)
        ASSERT_EQ(moe_membudget_acquire(b, steps[i].bytes), steps[i].want);
    ASSERT_TRUE(moe_membudget_fits(b, 1000) && !moe_membudget_fits(b, 1001));
    moe_membudget_get_stats(b, &st);
    ASSERT_EQ(st.used, 1000u);
    ASSERT_EQ(st.peak, 1000u);
    ASSERT_EQ(st.waits, 2u);
    ASSERT_EQ(st.refused, 1u);
    ASSERT_TRUE(!moe_membudget_trim_due(b));
    moe_membudget_release(b, 600);
    ASSERT_EQ(moe_membudget_acquire(b, 600), 0);
    ASSERT_TRUE(moe_membudget_trim_due(b)); /* 1600 charged since the start */
    moe_membudget_release(b, 1000);

    /* The pool: a buffer comes back for a request of about its size. */
    p = moe_membudget_buf_get(b, 1000, &cap);
    ASSERT_TRUE(p != NULL);
    ASSERT_EQ(cap, 1024u); /* rounded to 64 */
    memset(p, 1, cap);
    moe_membudget_buf_put(b, p, cap);
    q = moe_membudget_buf_get(b, 200, &cap2); /* too small for that one: a new buffer */
    ASSERT_TRUE(q != p);
    moe_membudget_buf_put(b, q, cap2);
    r = moe_membudget_buf_get(b, 900, &cap2);
    ASSERT_TRUE(r == p && cap2 == 1024u);
    moe_membudget_buf_put(b, r, cap2);
    /* At most pool_bytes pooled: a larger buffer is freed, not kept. */
    p = moe_membudget_buf_get(b, 8192, &cap);
    moe_membudget_buf_put(b, p, cap);
    moe_membudget_get_stats(b, &st);
    ASSERT_EQ(st.pooled, 1024u + 256u);
    ASSERT_EQ(st.pool_hits, 1u);

    moe_membudget_trim(b);
    moe_membudget_get_stats(b, &st);
    ASSERT_EQ(st.pooled, 0u);
    ASSERT_EQ(st.trims, 1u);
    ASSERT_TRUE(!moe_membudget_trim_due(b));

    /* No limit: everything fits. */
    moe_membudget_free(b);
    ASSERT_EQ(moe_membudget_create(NULL, &b, &err), 0);
    ASSERT_EQ(moe_membudget_acquire(b, UINT64_MAX / 2), 0);
    moe_membudget_release(b, UINT64_MAX / 2);
    moe_membudget_free(b);
    printf("ok\n");
    return 0;
}
