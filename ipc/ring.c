/*
 * SPSC rings in shared memory (ring.h).
 *
 * Memory order, at each use:
 *   producer: reads head (acquire: the consumer is done with those slots),
 *             writes the entry, publishes tail (release: the entry's bytes
 *             happen-before the consumer's acquire of tail);
 *   consumer: reads tail (acquire, pairs with the producer's release),
 *             copies the entry out, publishes head (release: the copy
 *             happens-before the producer reusing the slot).
 * Sleeping: a waiter sets its sleeping word (seq_cst), re-checks the ring,
 * then FUTEX_WAITs on the word while it is 1; the other side, after
 * publishing, reads the word (seq_cst) and wakes when it is 1.  The seq_cst
 * pair forbids the lost-wakeup interleaving (waiter misses the publish and
 * the publisher misses the sleeper).
 */
#include "ring.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static size_t align_up(size_t v, size_t a)
{
    return (v + a - 1) / a * a;
}

size_t moe_ring_bytes(uint32_t capacity, uint32_t entry_size)
{
    return align_up(sizeof(struct moe_ring_ctl), MOE_RING_CACHELINE) +
           align_up((size_t)capacity * entry_size, MOE_RING_CACHELINE);
}

static bool pow2(uint32_t v)
{
    return v && !(v & (v - 1));
}

static void view(void *mem, uint32_t capacity, uint32_t entry_size, struct moe_ring *r)
{
    r->ctl = mem;
    r->entries = (uint8_t *)mem + align_up(sizeof(struct moe_ring_ctl), MOE_RING_CACHELINE);
    r->capacity = capacity;
    r->entry_size = entry_size;
}

int moe_ring_init(void *mem, uint32_t capacity, uint32_t entry_size, struct moe_ring *ret)
{
    struct moe_ring_ctl *c = mem;

    if (!mem || !pow2(capacity) || capacity > (1u << 24) || entry_size == 0 ||
        ((uintptr_t)mem % MOE_RING_CACHELINE))
        return -EINVAL;
    memset(c, 0, sizeof(*c));
    c->capacity = capacity;
    c->entry_size = entry_size;
    view(mem, capacity, entry_size, ret);
    return 0;
}

int moe_ring_attach(void *mem, uint32_t capacity, uint32_t entry_size, struct moe_ring *ret)
{
    const struct moe_ring_ctl *c = mem;

    if (!mem || ((uintptr_t)mem % MOE_RING_CACHELINE) || !pow2(capacity) ||
        c->capacity != capacity || c->entry_size != entry_size)
        return -EPROTO;
    view(mem, capacity, entry_size, ret);
    return 0;
}

static long futex(_Atomic uint32_t *word, int op, uint32_t val, const struct timespec *ts)
{
    return syscall(SYS_futex, (uint32_t *)word, op, val, ts, NULL, 0);
}

/* Waits until ready() or the timeout (< 0: none); 0 or -ETIMEDOUT. */
static int wait_for(struct moe_ring *r, _Atomic uint32_t *sleeping,
                    bool (*ready)(const struct moe_ring *), int timeout_ms)
{
    struct timespec end, now, left;

    clock_gettime(CLOCK_MONOTONIC, &end);
    for (int i = 0;; i++) {
        if (ready(r))
            return 0;
        if ((i & 63) == 63) { /* the clock is read every 64 polls */
            clock_gettime(CLOCK_MONOTONIC, &now);
            if ((now.tv_sec - end.tv_sec) * 1000000000L + (now.tv_nsec - end.tv_nsec) >=
                MOE_RING_SPIN_NS)
                break;
        }
    }
    if (timeout_ms >= 0) {
        end.tv_sec += timeout_ms / 1000;
        end.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
        if (end.tv_nsec >= 1000000000) {
            end.tv_sec++;
            end.tv_nsec -= 1000000000;
        }
    }
    for (;;) {
        atomic_store(sleeping, 1); /* seq_cst: pairs with the waker's load */
        if (ready(r)) {
            atomic_store(sleeping, 0);
            return 0;
        }
        if (timeout_ms >= 0) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            left.tv_sec = end.tv_sec - now.tv_sec;
            left.tv_nsec = end.tv_nsec - now.tv_nsec;
            if (left.tv_nsec < 0) {
                left.tv_sec--;
                left.tv_nsec += 1000000000;
            }
            if (left.tv_sec < 0) {
                atomic_store(sleeping, 0);
                return ready(r) ? 0 : -ETIMEDOUT;
            }
        }
        /* Shared (not FUTEX_PRIVATE): the other side is another process. */
        futex(sleeping, FUTEX_WAIT, 1, timeout_ms >= 0 ? &left : NULL);
        atomic_store(sleeping, 0);
        if (ready(r))
            return 0;
    }
}

static void wake(_Atomic uint32_t *sleeping)
{
    if (atomic_load(sleeping)) /* seq_cst: pairs with the waiter's store */
        futex(sleeping, FUTEX_WAKE, INT_MAX, NULL);
}

uint32_t moe_ring_count(const struct moe_ring *r)
{
    uint32_t tail = atomic_load_explicit(&r->ctl->tail, memory_order_acquire);
    uint32_t head = atomic_load_explicit(&r->ctl->head, memory_order_acquire);

    return tail - head;
}

static bool has_room(const struct moe_ring *r)
{
    return moe_ring_count(r) < r->capacity || moe_ring_count(r) > r->capacity;
}

static bool has_entry(const struct moe_ring *r)
{
    return moe_ring_count(r) != 0;
}

int moe_ring_push(struct moe_ring *r, const void *entry, int timeout_ms)
{
    /* tail is ours: relaxed; head is the consumer's: acquire (its copy out
     * of the slot happens-before we overwrite it). */
    uint32_t tail = atomic_load_explicit(&r->ctl->tail, memory_order_relaxed);
    uint32_t head = atomic_load_explicit(&r->ctl->head, memory_order_acquire);
    int rc;

    if (tail - head > r->capacity)
        return -EPROTO;
    if (tail - head == r->capacity) {
        if (timeout_ms == 0)
            return -EAGAIN;
        rc = wait_for(r, &r->ctl->producer_sleeping, has_room, timeout_ms);
        if (rc < 0)
            return rc;
        head = atomic_load_explicit(&r->ctl->head, memory_order_acquire);
        if (tail - head >= r->capacity)
            return -EPROTO; /* woken, yet no room: a broken consumer */
    }
    memcpy(r->entries + (size_t)(tail & (r->capacity - 1)) * r->entry_size, entry, r->entry_size);
    /* release: the entry's bytes before the new tail */
    atomic_store_explicit(&r->ctl->tail, tail + 1, memory_order_release);
    wake(&r->ctl->consumer_sleeping);
    return 0;
}

int moe_ring_pop(struct moe_ring *r, void *entry, int timeout_ms)
{
    /* head is ours: relaxed; tail is the producer's: acquire (pairs with
     * its release, so the entry's bytes are visible). */
    uint32_t head = atomic_load_explicit(&r->ctl->head, memory_order_relaxed);
    uint32_t tail = atomic_load_explicit(&r->ctl->tail, memory_order_acquire);
    int rc;

    if (tail - head > r->capacity)
        return -EPROTO;
    if (tail == head) {
        if (timeout_ms == 0)
            return -EAGAIN;
        rc = wait_for(r, &r->ctl->consumer_sleeping, has_entry, timeout_ms);
        if (rc < 0)
            return rc;
        tail = atomic_load_explicit(&r->ctl->tail, memory_order_acquire);
        if (tail - head > r->capacity)
            return -EPROTO;
    }
    /* Copied out before anyone looks at it: the producer may be hostile. */
    memcpy(entry, r->entries + (size_t)(head & (r->capacity - 1)) * r->entry_size, r->entry_size);
    /* release: our copy is done before the producer may reuse the slot */
    atomic_store_explicit(&r->ctl->head, head + 1, memory_order_release);
    wake(&r->ctl->producer_sleeping);
    return 0;
}

void moe_ring_wake_all(struct moe_ring *r)
{
    futex(&r->ctl->consumer_sleeping, FUTEX_WAKE, INT_MAX, NULL);
    futex(&r->ctl->producer_sleeping, FUTEX_WAKE, INT_MAX, NULL);
}
